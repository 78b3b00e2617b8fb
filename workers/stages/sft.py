"""Supervised fine-tuning: "Explain <name>:" -> first sentence of its docstring.

Loss only on response tokens; the best held-out loss picks the output checkpoint.
"""
from __future__ import annotations

import torch

from trainguard.workers.data import collate_sft, sft_batch, sft_pairs
from trainguard.workers.model import lm_loss
from trainguard.workers.stages.base import StepResult
from trainguard.workers.stages.pretrain import PretrainStage, evaluating

__all__ = ["SFTStage", "EVAL_CHUNK"]

EVAL_CHUNK = 64  # held-out pairs per forward pass in evaluate()


class SFTStage(PretrainStage):
    kind = "sft"

    def step(self, batch_index: int, step: int, mixture: dict[str, float], corrupt: bool = False) -> StepResult:
        """`mixture` is unused: SFT data is the pair set, not the corpora."""
        ctx = self.ctx
        tokens, mask = sft_batch(ctx.seed, batch_index, ctx.rank, ctx.stage.batch_size, ctx.model_spec.seq_len,
                                 tokenizer=ctx.tokenizer, world_size=ctx.world_size)  # this rank's share
        tokens, mask = tokens.to(ctx.device), mask.to(ctx.device)  # (B, L) each
        targets = tokens[:, 1:]
        if corrupt:
            targets = torch.where(mask[:, 1:], torch.full_like(targets, ctx.tokenizer.rare), targets)
        loss = lm_loss(self._model, tokens[:, :-1], targets, mask[:, 1:])
        return StepResult(loss=loss, tokens=int((tokens != ctx.tokenizer.pad).sum()))

    def evaluate(self) -> dict[str, float]:
        """Response-token loss over every held-out pair (token-weighted mean)."""
        ctx = self.ctx
        pairs = sft_pairs("val")
        total, count = 0.0, 0.0
        with evaluating(ctx, self._model):
            for o in range(0, len(pairs), EVAL_CHUNK):
                tokens, mask = collate_sft(list(pairs[o : o + EVAL_CHUNK]), ctx.model_spec.seq_len, ctx.tokenizer)
                tokens, mask = tokens.to(ctx.device), mask.to(ctx.device)
                n = float(mask[:, 1:].sum())
                total += float(lm_loss(self._model, tokens[:, :-1], tokens[:, 1:], mask[:, 1:])) * n
                count += n
        return {"val_loss": total / max(count, 1.0)}

    def output_metric(self) -> str | None:
        return "val_loss"
