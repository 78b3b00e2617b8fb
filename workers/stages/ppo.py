"""PPO with a KL penalty (Ziegler et al., 2019; InstructGPT's PPO-ptx).

Each step: sample responses to a batch of prompts from the policy (generator seeded
from (seed, step, rank)), score them with the frozen reward model, subtract
kl_coef · KL(policy ‖ SFT reference) summed over the response tokens, and take a
PPO-clip step with a whitened batch-mean baseline. One optimizer step per rollout
means the ratio is 1 in value, so the clip never binds; the form is kept so more
epochs per rollout would be correct.

A PPO objective is centred on zero by its baseline, so alone it gives the guard
nothing to measure a spike against; the ptx term (next-token loss on an SFT batch,
as in InstructGPT) gives the stage loss a positive scale, keeps the policy fluent,
and is what the corrupted-batch fault corrupts (together with negated rewards).

The KL coefficient follows a proportional controller toward `kl_target` over
`kl_horizon` (Ziegler et al. §2.2) and is checkpointed through extra_state().
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from trainguard.workers.data import prompt_batch, sft_batch
from trainguard.workers.model import GPT, RewardModel, build_scorer, generate, lm_loss, load_weights, token_logprobs
from trainguard.workers.stages.base import Stage, StageContext, StepResult
from trainguard.workers.stages.dpo import policy_and_reference
from trainguard.workers.stages.pretrain import evaluating, find_input, frozen, init_seed, local_batch_size, step_generator
from trainguard.workers.tokenizer import EOS

__all__ = ["PPOStage", "kl_controller_update", "response_mask", "CLIP_EPS", "PTX_COEF"]

CLIP_EPS = 0.2
PTX_COEF = 0.5
MAX_KL_ERROR = 0.2  # Ziegler et al. clip the proportional error to ±0.2


def kl_controller_update(kl_coef: float, kl: float, target: float, n_samples: int, horizon: int) -> float:
    """β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon): raise β when the policy drifts too far."""
    error = min(max(kl / target - 1.0, -MAX_KL_ERROR), MAX_KL_ERROR)
    return kl_coef * (1.0 + error * n_samples / horizon)


def response_mask(response: torch.Tensor, eos: int = EOS) -> torch.Tensor:
    """(B, n) True up to and including the first EOS of each sampled response."""
    eos_before = (response == eos).long().cumsum(1) - (response == eos).long()  # EOS strictly before t
    return eos_before == 0


class PPOStage(Stage):
    kind = "ppo"

    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        self._model, self.reference = policy_and_reference(ctx)
        self.reward_model: RewardModel = build_scorer(ctx.model_spec, init_seed(ctx, "reward_model"), ctx.device,
                                                      ctx.tokenizer)
        load_weights(self.reward_model, find_input(ctx, ctx.stage.reward_model, "reward_model"))
        frozen(self.reward_model)
        self.kl_coef = float(ctx.stage.kl_coef)

    @property
    def model(self) -> GPT:
        return self._model

    def _sample(
        self, prompts: torch.Tensor, pvalid: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Responses to left-padded `prompts` (B, P): sequences (B, P+n) with PAD after each
        EOS, their valid mask (B, P+n), and P."""
        st = self.ctx.stage
        was_training = self._model.training
        self._model.eval()
        seq = generate(self._model, prompts, st.response_len, generator, st.temperature, pvalid)
        self._model.train(was_training)
        P = prompts.shape[1]
        rmask = response_mask(seq[:, P:], self.ctx.tokenizer.eos)  # (B, n)
        seq = torch.cat([seq[:, :P], seq[:, P:].masked_fill(~rmask, self.ctx.tokenizer.pad)], dim=1)  # (B, P+n)
        return seq, torch.cat([pvalid, rmask], dim=1), P

    def _prompts(self, batch_index: int, rank: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Training: this rank's share of global batch `batch_index`; validation (rank 0 alone):
        a local-sized batch, as before."""
        ctx = self.ctx
        max_prompt = ctx.model_spec.seq_len - ctx.stage.response_len
        if split == "train":
            prompts, pvalid = prompt_batch(ctx.seed, batch_index, rank, ctx.stage.batch_size, max_prompt, split,
                                           tokenizer=ctx.tokenizer, world_size=ctx.world_size)
        else:
            prompts, pvalid = prompt_batch(ctx.seed, batch_index, rank, local_batch_size(ctx), max_prompt, split,
                                           tokenizer=ctx.tokenizer)
        return prompts.to(ctx.device), pvalid.to(ctx.device)  # (B, P) each

    def _kl(self, seq: torch.Tensor, valid: torch.Tensor, P: int, logp: torch.Tensor) -> torch.Tensor:
        """Per-sequence KL(policy ‖ reference) estimate: Σ over response tokens of log π − log π_ref. (B,)"""
        with torch.no_grad():
            ref_logp = token_logprobs(self.reference, seq, valid)[:, P - 1 :]  # (B, n)
        return ((logp.detach() - ref_logp) * valid[:, P:].float()).sum(1)

    def _global_mean(self, *values: float) -> list[float]:
        """Means over ranks, so every rank's KL controller takes the same steps."""
        if self.ctx.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(t)
        return (t / self.ctx.world_size).tolist()

    def step(self, batch_index: int, step: int, mixture: dict[str, float], corrupt: bool = False) -> StepResult:
        ctx = self.ctx
        seq, valid, P = self._sample(*self._prompts(batch_index, ctx.rank), step_generator(ctx, step, "ppo"))
        rmask = valid[:, P:].float()  # (B, n)
        logp = token_logprobs(self._model, seq, valid)[:, P - 1 :]  # (B, n), with grad
        kl = self._kl(seq, valid, P, logp)  # (B,)
        with torch.no_grad():
            score = self.reward_model(seq, valid)  # (B,)
            reward = score - self.kl_coef * kl
            if corrupt:
                reward = -reward
            adv = (reward - reward.mean()) / (reward.std(unbiased=False) + 1e-6)  # (B,)
        ratio = torch.exp(logp - logp.detach())  # (B, n); 1 in value, d/dθ = d log π
        surrogate = torch.minimum(ratio * adv[:, None], ratio.clamp(1 - CLIP_EPS, 1 + CLIP_EPS) * adv[:, None])
        pg_loss = -(surrogate * rmask).sum() / rmask.sum().clamp(min=1.0)
        loss = pg_loss + PTX_COEF * self._ptx_loss(batch_index, corrupt)
        kl_mean, score_mean = self._global_mean(float(kl.mean()), float(score.mean()))
        metrics = {"reward_mean": score_mean, "kl": kl_mean, "kl_coef": self.kl_coef, "kl_target": ctx.stage.kl_target}
        return StepResult(loss=loss, tokens=int(valid.sum()), metrics=metrics)

    def _ptx_loss(self, batch_index: int, corrupt: bool) -> torch.Tensor:
        ctx = self.ctx
        tokens, mask = sft_batch(ctx.seed, batch_index, ctx.rank, ctx.stage.batch_size, ctx.model_spec.seq_len,
                                 tokenizer=ctx.tokenizer, world_size=ctx.world_size)  # this rank's share
        tokens, mask = tokens.to(ctx.device), mask.to(ctx.device)  # (B, L)
        targets = tokens[:, 1:]
        if corrupt:
            targets = torch.where(mask[:, 1:], torch.full_like(targets, ctx.tokenizer.rare), targets)
        return lm_loss(self._model, tokens[:, :-1], targets, mask[:, 1:])

    def after_step(self, result: StepResult, step: int) -> None:
        st = self.ctx.stage
        n = st.batch_size  # the global batch the KL was measured over
        self.kl_coef = kl_controller_update(self.kl_coef, result.metrics["kl"], st.kl_target, n, st.kl_horizon)

    def extra_state(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_coef}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.kl_coef = float(state.get("kl_coef", self.kl_coef))

    def evaluate(self) -> dict[str, float]:
        """Reward and KL of fixed rollouts on eval_batches batches of held-out prompts
        (the same on every rank, the same generator every time)."""
        ctx = self.ctx
        scores, kls = [], []
        with evaluating(ctx, self._model):
            generator = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
            for i in range(ctx.stage.eval_batches):
                seq, valid, P = self._sample(*self._prompts(i, 0, "val"), generator)
                kls.append(self._kl(seq, valid, P, token_logprobs(self._model, seq, valid)[:, P - 1 :]))
                scores.append(self.reward_model(seq, valid))
        return {"val_reward_mean": float(torch.cat(scores).mean()), "val_kl": float(torch.cat(kls).mean())}
