"""Reward model: Bradley–Terry on (chosen, rejected) pairs, backbone from the SFT model.

The loss is -log σ(r(chosen) - r(rejected)); held-out preference accuracy tells
whether the model learned to prefer the right summary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainguard.workers.data import collate_preferences, garble_responses, preference_batch, preference_pairs
from trainguard.workers.model import RewardModel, build_scorer, load_weights
from trainguard.workers.stages.base import Stage, StageContext, StepResult
from trainguard.workers.stages.pretrain import evaluating, init_seed

__all__ = ["RewardModelStage", "corrupt_preferences", "EVAL_CHUNK"]

EVAL_CHUNK = 64


def corrupt_preferences(
    chosen: torch.Tensor, chosen_mask: torch.Tensor, *key: object, tokenizer: object = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss_spike fault for preference data: the right answer becomes the rejected one
    and a garbled copy of it the chosen one — the exact opposite of what was learned."""
    return garble_responses(chosen, chosen_mask, *key, tokenizer=tokenizer), chosen_mask, chosen, chosen_mask


class RewardModelStage(Stage):
    kind = "reward_model"

    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        self._model = build_scorer(ctx.model_spec, init_seed(ctx, "reward_model"), ctx.device, ctx.tokenizer)
        if ctx.init_checkpoint is not None:  # an SFT (GPT) checkpoint becomes the backbone
            load_weights(self._model, ctx.init_checkpoint)

    @property
    def model(self) -> RewardModel:
        return self._model

    def _scores(self, chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self._model(torch.cat([chosen, rejected]))  # (2B,)
        return r.chunk(2)

    def step(self, batch_index: int, step: int, mixture: dict[str, float], corrupt: bool = False) -> StepResult:
        ctx = self.ctx
        ch, chm, rj, rjm = preference_batch(ctx.seed, batch_index, ctx.rank, ctx.stage.batch_size, ctx.model_spec.seq_len,
                                            tokenizer=ctx.tokenizer, world_size=ctx.world_size)  # this rank's share
        if corrupt:
            ch, chm, rj, rjm = corrupt_preferences(ch, chm, "rm", ctx.seed, batch_index, ctx.rank, tokenizer=ctx.tokenizer)
        ch, rj = ch.to(ctx.device), rj.to(ctx.device)  # (B, L) each
        r_ch, r_rj = self._scores(ch, rj)  # (B,) each
        loss = -F.logsigmoid(r_ch - r_rj).mean()
        acc = float((r_ch > r_rj).float().mean())
        pad = ctx.tokenizer.pad
        return StepResult(loss=loss, tokens=int((ch != pad).sum() + (rj != pad).sum()), metrics={"preference_accuracy": acc})

    def evaluate(self) -> dict[str, float]:
        """Bradley–Terry loss and accuracy over every held-out pair."""
        ctx = self.ctx
        pairs = preference_pairs("val")
        losses, wins = [], []
        with evaluating(ctx, self._model):
            for o in range(0, len(pairs), EVAL_CHUNK):
                ch, _, rj, _ = collate_preferences(list(pairs[o : o + EVAL_CHUNK]), ctx.model_spec.seq_len, ctx.tokenizer)
                r_ch, r_rj = self._scores(ch.to(ctx.device), rj.to(ctx.device))
                losses.append(-F.logsigmoid(r_ch - r_rj))
                wins.append((r_ch > r_rj).float())
        return {"val_loss": float(torch.cat(losses).mean()), "preference_accuracy": float(torch.cat(wins).mean())}

    def output_metric(self) -> str | None:
        return "val_loss"
