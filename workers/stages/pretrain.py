"""Pretraining: next-byte prediction on a weighted mixture of the corpora.

Also home of the helpers every stage shares (local batch size, eval mode under
autocast, finding an earlier stage's checkpoint), since the other stage modules
build on this one.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import torch
from torch import nn

from trainguard.workers.contract import MANIFEST_NAME, CheckpointRef
from trainguard.workers.data import derive_seed, get_mixture
from trainguard.workers.model import GPT, build_lm, lm_loss, load_weights
from trainguard.workers.stages.base import Stage, StageContext, StepResult

__all__ = ["PretrainStage", "local_batch_size", "evaluating", "find_input", "frozen", "init_seed", "step_generator"]


def local_batch_size(ctx: StageContext) -> int:
    """This rank's share of the stage's global batch_size."""
    return max(1, ctx.stage.batch_size // ctx.world_size)


def init_seed(ctx: StageContext, what: str) -> int:
    """Seed for fresh weights: the same on every rank (ranks must start identical)."""
    return derive_seed("init", ctx.seed, what) % 2**63


def step_generator(ctx: StageContext, step: int, what: str) -> torch.Generator:
    """Sampling inside a step: seeded from (seed, step, rank), on the stage's device."""
    return torch.Generator(device=ctx.device).manual_seed(derive_seed(what, ctx.seed, step, ctx.rank) % 2**63)


@contextlib.contextmanager
def evaluating(ctx: StageContext, *modules: nn.Module) -> Iterator[None]:
    """no_grad, eval mode (restored after) and the harness's autocast on CUDA."""
    modes = [m.training for m in modules]
    amp = (
        torch.autocast(device_type=ctx.device.type, dtype=ctx.autocast_dtype)
        if ctx.autocast_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        for m in modules:
            m.eval()
        with torch.no_grad(), amp:
            yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _stage_kind(ref: CheckpointRef) -> str | None:
    from trainguard.workers.runtime.checkpoint import read_verified  # lazy: the runtime package imports the stages

    return json.loads(read_verified(ref, [])[MANIFEST_NAME]).get("stage_kind")


def find_input(ctx: StageContext, name: str | None, kind: str) -> CheckpointRef:
    """Checkpoint of the earlier stage `name`, or (name None) of the last earlier stage of
    `kind` — ctx.inputs is in pipeline order and each (verified) manifest names its stage_kind."""
    if name is not None:
        if name not in ctx.inputs:
            raise ValueError(
                f"stage {ctx.stage.name!r} needs the output of stage {name!r}, which is not among its inputs {sorted(ctx.inputs)}"
            )
        return ctx.inputs[name]
    for ref in reversed(list(ctx.inputs.values())):
        if _stage_kind(ref) == kind:
            return ref
    raise ValueError(f"stage {ctx.stage.name!r} needs an earlier {kind} stage's output; inputs: {sorted(ctx.inputs)}")


def frozen(module: nn.Module) -> nn.Module:
    """A module used only for inference (reference policy, reward model): never trained."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class PretrainStage(Stage):
    kind = "pretrain"

    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        self.data = get_mixture(ctx.data_files, ctx.tokenizer)
        self._model = build_lm(ctx.model_spec, init_seed(ctx, "gpt"), ctx.device, ctx.tokenizer)
        if ctx.init_checkpoint is not None:
            load_weights(self._model, ctx.init_checkpoint)

    @property
    def model(self) -> GPT:
        return self._model

    def step(self, batch_index: int, step: int, mixture: dict[str, float], corrupt: bool = False,
             samples: list[int] | None = None) -> StepResult:
        ctx = self.ctx
        # this rank's share of global batch `batch_index`, by global sample index: the same
        # samples whatever the world size (workers/data.py `sample_indices`); a micro-step
        # names its `samples`
        if samples is None:
            batch = self.data.batch(
                ctx.seed, batch_index, ctx.rank, ctx.stage.batch_size, ctx.model_spec.seq_len, mixture,
                world_size=ctx.world_size,
            )
        else:
            batch = self.data.samples(ctx.seed, samples, ctx.stage.batch_size, ctx.model_spec.seq_len, mixture)
        batch = batch.to(ctx.device)  # (B, T+1)
        inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
        if corrupt:  # a byte the corpora never contain: loss goes to ~ -log(tiny)
            targets = torch.full_like(targets, ctx.tokenizer.rare)
        return StepResult(loss=lm_loss(self._model, inputs, targets), tokens=inputs.numel())

    def evaluate(self) -> dict[str, float]:
        """Mean loss over eval_batches fixed held-out windows (the same on every rank)."""
        ctx = self.ctx
        losses = []
        with evaluating(ctx, self._model):
            for i in range(ctx.stage.eval_batches):
                b = self.data.batch(
                    ctx.seed, i, 0, local_batch_size(ctx), ctx.model_spec.seq_len, dict(ctx.stage.mixture), split="val"
                ).to(ctx.device)  # (B, T+1)
                losses.append(float(lm_loss(self._model, b[:, :-1], b[:, 1:])))
        return {"val_loss": sum(losses) / len(losses)}
