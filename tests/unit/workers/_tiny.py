"""A tiny test-only Stage: a 2-layer MLP language model over random token ids.

Deterministic per (seed, batch_index, rank), like the real stages, and ~1k parameters
so the runtime tests stay fast on two shared cores."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from trainguard.workers.contract import CheckpointRef
from trainguard.workers.spec import parse_pipeline
from trainguard.workers.stages.base import Stage, StepResult

VOCAB = 16


class TinyStage(Stage):
    kind = "pretrain"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        torch.manual_seed(ctx.seed)
        self._model = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, VOCAB))

    @property
    def model(self) -> nn.Module:
        return self._model

    def _batch(self, batch_index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + batch_index * 31 + self.ctx.rank)
        x = torch.randint(0, VOCAB // 2, (8,), generator=g)
        return x

    def step(self, batch_index, step, mixture, corrupt=False) -> StepResult:
        x = self._batch(batch_index)
        y = (x + 1) % VOCAB  # learnable: next id
        if corrupt:
            y = torch.full_like(y, VOCAB - 1)  # a token the model learns never follows
        logits = self._model(x)
        # dropout-like use of the global RNG, so RNG restore is exercised by exact resume
        noise = torch.rand(()) * 1e-3
        loss = nn.functional.cross_entropy(logits, y) + noise
        return StepResult(loss=loss, tokens=x.numel(), metrics={})

    def evaluate(self) -> dict[str, float]:
        x = torch.arange(VOCAB // 2)
        return {"val_loss": float(nn.functional.cross_entropy(self._model(x), (x + 1) % VOCAB))}


def tiny_spec(steps: int = 30, **stage_overrides):
    stage = {"name": "pretrain", "kind": "pretrain", "steps": steps, "lr": 0.01, "warmup_steps": 2,
             "eval_every": 10, "batch_size": 8}
    stage.update(stage_overrides)
    return parse_pipeline({"name": "tiny", "seed": 3, "model": {"n_layer": 1, "n_head": 1, "d_model": 8, "seq_len": 8},
                           "checkpoint": {"every": 5, "keep_last": 3}, "stages": [stage]})


def recorded(d: Path) -> CheckpointRef:
    """The reference a worker would have reported for the files now in folder `d`."""
    return CheckpointRef(str(d), {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                           "bytes": p.stat().st_size} for p in d.iterdir()})


def stop_at(k: int):
    """An `on_step` hook that sends STOP when the harness reaches step `k`."""
    from trainguard.workers.contract import Control, ControlKind

    def hook(h) -> None:
        if h.step == k:
            h.inbox.put(Control(ControlKind.STOP, seq=1))
    return hook


def weights(h) -> dict[str, torch.Tensor]:
    """A copy of the harness's model weights."""
    return {k: v.clone() for k, v in h.stage.model.state_dict().items()}

