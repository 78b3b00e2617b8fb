"""A user stage in its own file: a regression objective trainguard guards like its own stages.

The stage fits a small MLP to y = sin(x.w / 2) + x.v / 4 on 16-dimensional inputs. Every
sample is a pure function of (seed, global sample index), so a batch is a pure function of its
index: what trainguard's skip list and exact resume rely on. `corrupt=True` (the loss_spike
fault) scales the targets by 30, a loss far above the trained one.

Run it (README, "Guard your own code"):

    export TRAINGUARD_USER_CODE_PATHS=$PWD/examples/custom_stage TRAINGUARD_USER_CODE_MODULES=regression_stage
    trainguard serve &
    trainguard submit examples/custom_stage/pipeline.yaml --wait
"""
from __future__ import annotations

import torch
from torch import nn

from trainguard.workers.stages.base import Stage, StageContext, StepResult

DIM = 16
VAL_SAMPLES = 256
VAL_OFFSET = 1 << 40  # held-out samples come from indices training never reaches


def make_samples(seed: int, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) for the given global sample indices: each sample from its own seeded generator."""
    w = torch.Generator().manual_seed(seed)
    wv = torch.randn(2, DIM, generator=w)
    xs = []
    for i in indices:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        xs.append(torch.randn(DIM, generator=g))
    x = torch.stack(xs)
    y = torch.sin(2.0 * (x @ wv[0]) / DIM ** 0.5) + (x @ wv[1]) / DIM ** 0.5
    return x, y.unsqueeze(1)


class RegressionStage(Stage):
    api_version = 1

    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        width = int(ctx.options.get("width", 64))
        torch.manual_seed(ctx.seed)  # the same initial weights on every rank
        self._model = nn.Sequential(nn.Linear(DIM, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                    nn.Linear(width, 1)).to(ctx.device)

    @property
    def model(self) -> nn.Module:
        return self._model

    def step(self, batch_index: int, step: int, mixture: dict[str, float], corrupt: bool = False,
             samples: list[int] | None = None) -> StepResult:
        ctx = self.ctx
        x, y = make_samples(ctx.seed, ctx.sample_indices(batch_index, samples))
        x, y = x.to(ctx.device), y.to(ctx.device)
        if corrupt:
            y = y * 30.0
        loss = nn.functional.mse_loss(self._model(x), y)
        return StepResult(loss=loss, tokens=x.shape[0])

    def evaluate(self) -> dict[str, float]:
        x, y = make_samples(self.ctx.seed, list(range(VAL_OFFSET, VAL_OFFSET + VAL_SAMPLES)))
        x, y = x.to(self.ctx.device), y.to(self.ctx.device)
        return {"val_loss": float(nn.functional.mse_loss(self._model(x), y))}
