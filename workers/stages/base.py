"""The stage interface, version 1 (`Stage.api_version`): what every stage gives the runtime
harness (workers/runtime/harness.py). Public: a user's `kind: custom` stage subclasses `Stage`
exactly as the six built-in stages do (docs/user-code.md). A change that breaks a subclass
written against it raises the version (workers/usercode.py STAGE_API_VERSION).

The harness owns the step loop: data cursor and skip list, backward, gradient
all-reduce, clipping, the guard, optimizer and LR schedule, checkpoints, metrics
and control. A stage owns only its objective: which modules exist, how a batch is
built from a batch index, how the loss is computed, how it is evaluated.

Determinism: a batch is a pure function of (seed, batch_index, rank, mixture), and
any sampling inside `step` uses a generator seeded from (seed, step, rank), so a
run resumed from a checkpoint reproduces an uninterrupted one bit for bit on CPU.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from trainguard.workers.contract import CheckpointRef
from trainguard.workers.data import sample_indices
from trainguard.workers.tokenizer import BYTE_TOKENIZER


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar, requires grad; the harness calls backward()
    tokens: int  # tokens this rank consumed in this step
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. reward_mean, kl, kl_coef


@dataclass
class StageContext:
    run_id: str
    rank: int
    world_size: int
    seed: int
    device: torch.device
    autocast_dtype: torch.dtype | None  # torch.bfloat16 on CUDA when supported, else None
    model_spec: Any  # workers.spec.ModelSpec
    stage: Any  # the stage's spec (workers.spec.*Stage)
    inputs: dict[str, CheckpointRef]  # stage name -> output checkpoint of earlier stages (with recorded hashes)
    init_checkpoint: CheckpointRef | None  # output of the stage this one starts from (None for pretrain)
    data_files: dict[str, str] = field(default_factory=dict)  # extra sources from the pipeline spec
    tokenizer: Any = BYTE_TOKENIZER  # workers.tokenizer.Tokenizer: bytes, or an HF model's (workers/hf.py)

    @property
    def options(self) -> dict[str, Any]:
        """A user stage's own settings (`options:` in its spec); empty for the built-in stages."""
        return dict(getattr(self.stage, "options", {}) or {})

    def sample_indices(self, batch_index: int, samples: list[int] | None = None) -> list[int]:
        """The global sample indices this rank trains on in global batch `batch_index` (`samples`:
        a gradient-accumulation micro-step's subset, passed through). A batch built from these is
        a pure function of the index: what the skip list and an exact resume rely on."""
        if samples is not None:
            return list(samples)
        return sample_indices(batch_index, self.rank, self.world_size, self.stage.batch_size)


class Stage(abc.ABC):
    kind: ClassVar[str] = "custom"
    api_version: ClassVar[int] = 1  # the interface version the subclass is written for

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx

    @property
    @abc.abstractmethod
    def model(self) -> nn.Module:
        """The trained module (its parameters get the optimizer); saved as model.pt."""

    @abc.abstractmethod
    def step(self, batch_index: int, step: int, mixture: dict[str, float], corrupt: bool = False,
             samples: list[int] | None = None) -> StepResult:
        """Forward pass for one optimizer step on this rank's shard of batch `batch_index`
        (`samples`: only these global sample indices of it — a gradient-accumulation
        micro-step; stages that accumulate (pretrain, anneal) honour it, the spec refuses
        `micro_batch_size` for the others).

        `corrupt=True` (the loss_spike fault, corrupt_batches mode) must build a
        corrupted batch from the same index such that the loss jumps at least 3x
        over a trained model's loss (e.g. targets replaced by a rare token)."""

    @abc.abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics: {"val_loss": ...} and/or {"preference_accuracy": ...}."""

    def after_step(self, result: StepResult, step: int) -> None:
        """Hook after a successful optimizer step (e.g. PPO's adaptive KL coefficient)."""

    def extra_state(self) -> dict[str, Any]:
        """Stage state beyond model/optimizer (e.g. KL coefficient); must be torch.save-able."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def output_metric(self) -> str | None:
        """Eval metric whose best value picks the stage's output checkpoint (lower is better),
        or None to use the final checkpoint."""
        return None
