"""DPO (Rafailov et al., 2023): preference optimisation without a reward model.

loss = -log σ(β [(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))]),
policy and frozen reference both start from the SFT output.

Signals per step (this rank's share): dpo_reward_margin (the β-scaled margin above),
preference_accuracy, dpo_chosen_logprob and dpo_rejected_logprob (the policy's summed
log-probs of the chosen and rejected responses). A β far too small lets the loss keep
widening the margin by pushing both log-probs down: the chosen log-prob falling while the
margin grows is the `dpo_collapse` detector's signal.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainguard.workers.data import collate_preferences, preference_batch, preference_pairs
from trainguard.workers.model import GPT, build_lm, load_weights, sequence_logprobs
from trainguard.workers.stages.base import Stage, StageContext, StepResult
from trainguard.workers.stages.pretrain import evaluating, find_input, frozen, init_seed
from trainguard.workers.stages.reward_model import EVAL_CHUNK, corrupt_preferences

__all__ = ["DPOStage", "policy_and_reference"]


def policy_and_reference(ctx: StageContext) -> tuple[GPT, GPT]:
    """Trainable policy and frozen reference, both from the SFT output (`reference`, or the
    last sft stage). The policy starts from `init_from` instead only when that is set:
    by default the previous stage may be a reward model or another RL stage."""
    ref_ckpt = find_input(ctx, getattr(ctx.stage, "reference", None), "sft")
    policy_ckpt = ctx.init_checkpoint if ctx.stage.init_from is not None and ctx.init_checkpoint else ref_ckpt
    policy = build_lm(ctx.model_spec, init_seed(ctx, "gpt"), ctx.device, ctx.tokenizer)
    load_weights(policy, policy_ckpt)
    reference = build_lm(ctx.model_spec, init_seed(ctx, "gpt"), ctx.device, ctx.tokenizer)
    load_weights(reference, ref_ckpt)
    return policy, frozen(reference)


class DPOStage(Stage):
    kind = "dpo"

    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        self._model, self.reference = policy_and_reference(ctx)

    @property
    def model(self) -> GPT:
        return self._model

    def _margins(self, ch, chm, rj, rjm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """β·(implicit reward of chosen - of rejected) (B,), and the policy's chosen and
        rejected log-probs (B,) each."""
        tokens, mask = torch.cat([ch, rj]), torch.cat([chm, rjm])  # (2B, L)
        pol = sequence_logprobs(self._model, tokens, mask)  # (2B,)
        with torch.no_grad():
            ref = sequence_logprobs(self.reference, tokens, mask)  # (2B,)
        pol_ch, pol_rj = pol.chunk(2)
        ref_ch, ref_rj = ref.chunk(2)
        return self.ctx.stage.beta * ((pol_ch - ref_ch) - (pol_rj - ref_rj)), pol_ch, pol_rj

    def step(self, batch_index: int, step: int, mixture: dict[str, float], corrupt: bool = False) -> StepResult:
        ctx = self.ctx
        batch = preference_batch(ctx.seed, batch_index, ctx.rank, ctx.stage.batch_size, ctx.model_spec.seq_len,
                                 tokenizer=ctx.tokenizer, world_size=ctx.world_size)  # this rank's share
        if corrupt:
            batch = corrupt_preferences(batch[0], batch[1], "dpo", ctx.seed, batch_index, ctx.rank, tokenizer=ctx.tokenizer)
        ch, chm, rj, rjm = (t.to(ctx.device) for t in batch)  # (B, L) each
        margin, pol_ch, pol_rj = self._margins(ch, chm, rj, rjm)
        loss = -F.logsigmoid(margin).mean()
        metrics = {
            "dpo_reward_margin": float(margin.detach().mean()),
            "preference_accuracy": float((margin.detach() > 0).float().mean()),
            "dpo_chosen_logprob": float(pol_ch.detach().mean()),
            "dpo_rejected_logprob": float(pol_rj.detach().mean()),
        }
        pad = ctx.tokenizer.pad
        return StepResult(loss=loss, tokens=int((ch != pad).sum() + (rj != pad).sum()), metrics=metrics)

    def evaluate(self) -> dict[str, float]:
        """DPO loss and accuracy (implicit reward of chosen above rejected) on every held-out pair."""
        ctx = self.ctx
        pairs = preference_pairs("val")
        margins = []
        with evaluating(ctx, self._model):
            for o in range(0, len(pairs), EVAL_CHUNK):
                batch = collate_preferences(list(pairs[o : o + EVAL_CHUNK]), ctx.model_spec.seq_len, ctx.tokenizer)
                margins.append(self._margins(*(t.to(ctx.device) for t in batch))[0])
        m = torch.cat(margins)
        return {
            "val_loss": float(-F.logsigmoid(m).mean()),
            "preference_accuracy": float((m > 0).float().mean()),
            "dpo_reward_margin": float(m.mean()),
        }
