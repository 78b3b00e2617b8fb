"""PPO with a value head, GAE and a KL penalty (Ziegler et al., 2019; InstructGPT's PPO-ptx).

Rollouts, epochs and the harness's steps
-----------------------------------------
The harness calls `step()` once per optimizer step. PPO reuses each rollout for
`ppo_epochs` passes of `minibatches` minibatches, so one rollout spans
`ppo_epochs x minibatches` harness steps (defaults 2 x 2 = 4):

- a step that finds the rollout buffer empty *starts a rollout*: it samples responses to
  its rank's share of the prompts of global batch `batch_index` (generator seeded from
  (seed, step, rank)), and under no_grad scores them with the frozen reward model, takes
  the log-probs of the policy as it is now (the "old" policy of the ratio), of the frozen
  SFT reference and the value head's predictions, builds per-token rewards
  (-kl_coef x (log pi - log pi_ref) on every response token, plus the reward model's
  score on the last one), GAE advantages (`gamma`, `lam`) and returns, and draws the
  minibatch order of every epoch (a permutation per epoch, seeded from the same step);
- every step, that one included, takes the next minibatch of the buffer and minimises
  the clipped surrogate -min(r A, clip(r, 1-eps, 1+eps) A) with r = pi/pi_old per token,
  plus `vf_coef` x the clipped value loss, plus `ptx_coef` x the ptx term; after the
  last minibatch of the last epoch the buffer is dropped and the next step starts a rollout.

The first minibatch after a rollout has r = 1 exactly (nothing has changed yet); the
later ones see the policy move and the clip bind.

Data cursor and skip list. Global batch index `b` (the harness's cursor) names the prompts
of a rollout when the step that takes `b` starts one, and the ptx batch (an SFT batch of
the same index) of every step. Steps that train on a buffered rollout therefore use their
batch index for the ptx term only: the prompts of those indices are never sampled. A skip
range removes its indices' prompts and ptx batches from the run, as for every stage; a
rollout already buffered when a checkpoint was saved came from an index before the
checkpoint's cursor, so it is never one a later skip range covers (skip ranges start at a
checkpoint's cursor). Exact resume: the buffer (sequences, old log-probs, advantages,
returns, the minibatch order and its position), the value head, its optimizer and the KL
coefficient are `extra_state()`; with the model, optimizer and RNG states the harness
saves, a resumed run continues mid-rollout bit for bit.

The value head is a linear layer on the policy's final hidden states (a shared trunk, as
in TRL's value-head models): its gradient reaches the trunk through the stage loss and the
harness's optimizer, while the head itself has its own AdamW (`value_lr`), stepped in
`after_step` (only when the guard let the step's update through), its gradient averaged
over the ranks there. The head is not part of `model`, so the stage's output (model.pt)
stays a plain language model that later stages and exports load unchanged.

A PPO objective is centred on zero by its whitened advantages, so alone it gives the guard
nothing to measure a spike against; the ptx term (next-token loss on an SFT batch, as in
InstructGPT) gives the stage loss a positive scale, keeps the policy fluent, and is what
the corrupted-batch fault corrupts (together with negated advantages).

The KL coefficient follows a proportional controller toward `kl_target` over
`kl_horizon` (Ziegler et al. §2.2), updated once per rollout with that rollout's KL.

Signals (StepResult.metrics; see workers/contract.py MetricName). Per rollout, means over
all ranks, repeated on every step of the rollout: reward_mean, kl (the per-sequence sum
of log pi - log pi_ref over the response: an estimate that is >= 0 in expectation only for
on-policy samples), response_length. Per step, rank-local, over the minibatch's response
tokens: ppo_ratio_mean, ppo_ratio_max, ppo_clip_fraction (tokens whose ratio is outside
the clip range), ppo_approx_kl (KL(pi_old || pi) by the k3 estimator), policy_entropy,
value_loss.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainguard.workers.data import derive_seed, prompt_batch, sft_batch
from trainguard.workers.model import GPT, RewardModel, build_scorer, generate, lm_loss, load_weights, token_logprobs
from trainguard.workers.stages.base import Stage, StageContext, StepResult
from trainguard.workers.stages.dpo import policy_and_reference
from trainguard.workers.stages.pretrain import evaluating, find_input, frozen, init_seed, local_batch_size, step_generator
from trainguard.workers.tokenizer import EOS

__all__ = ["PPOStage", "kl_controller_update", "response_mask", "gae", "masked_whiten"]

MAX_KL_ERROR = 0.2  # Ziegler et al. clip the proportional error to ±0.2
# the rollout buffer's tensors, in extra_state()
_BUFFER_TENSORS = ("seq", "valid", "old_logp", "values", "adv", "returns", "order")


def kl_controller_update(kl_coef: float, kl: float, target: float, n_samples: int, horizon: int) -> float:
    """β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon): raise β when the policy drifts too far."""
    error = min(max(kl / target - 1.0, -MAX_KL_ERROR), MAX_KL_ERROR)
    return kl_coef * (1.0 + error * n_samples / horizon)


def response_mask(response: torch.Tensor, eos: int = EOS) -> torch.Tensor:
    """(B, n) True up to and including the first EOS of each sampled response."""
    eos_before = (response == eos).long().cumsum(1) - (response == eos).long()  # EOS strictly before t
    return eos_before == 0


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al., 2016).

    rewards, values, mask: (B, n), `mask` a prefix (True up to the response's end). The value
    after the last valid token is 0 (the episode ends there). Returns (advantages, returns),
    both (B, n) and 0 where `mask` is False."""
    m = mask.to(values.dtype)
    v = values * m
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[:, 0])
    n = v.shape[1]
    for t in reversed(range(n)):
        nxt = v[:, t + 1] if t + 1 < n else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + v) * m


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the positions where `mask` is True; 0 elsewhere."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1.0)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * m


def _output_layer(model: nn.Module) -> nn.Module:
    """The module that maps final hidden states to logits (GPT's lm_head, an HF model's output embeddings)."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Module):
        return head
    return model.hf.get_output_embeddings()  # type: ignore[union-attr, operator, no-any-return]


def logits_and_hidden(model: nn.Module, tokens: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of the policy through its own `forward` (so FSDP2's hooks run): logits
    (B, T-1, V) for inputs tokens[:, :-1] and the final hidden states (B, T-1, D) the output
    layer read (caught by a pre-hook)."""
    caught: list[torch.Tensor] = []
    handle = _output_layer(model).register_forward_pre_hook(lambda _m, args: caught.append(args[0]))
    try:
        logits = model(tokens[:, :-1], valid[:, :-1])
    finally:
        handle.remove()
    return logits, caught[-1]


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
        width = int(_output_layer(self._model).weight.shape[1])
        with torch.random.fork_rng(devices=[]):  # the constructor draws from the global RNG
            self.value_head = nn.Linear(width, 1).to(ctx.device)
        with torch.no_grad():  # every value starts at 0, the same on every rank and every run
            self.value_head.weight.zero_()
            self.value_head.bias.zero_()
        self.value_optimizer = torch.optim.AdamW(self.value_head.parameters(), lr=float(ctx.stage.value_lr),
                                                 betas=(0.9, 0.95), weight_decay=0.0)
        self.buffer: dict[str, Any] | None = None  # the rollout being trained on (see the module docstring)
        self._rollout_kl: float | None = None  # set by a step that started a rollout, for after_step

    @property
    def model(self) -> GPT:
        return self._model

    # -- sampling -------------------------------------------------------------------------------
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

    # -- the rollout ----------------------------------------------------------------------------
    def _rollout(self, batch_index: int, step: int) -> dict[str, Any]:
        """Sample, score and compute advantages for this rank's share of global batch `batch_index`."""
        ctx, st = self.ctx, self.ctx.stage
        seq, valid, P = self._sample(*self._prompts(batch_index, ctx.rank), step_generator(ctx, step, "ppo"))
        rmask = valid[:, P:]  # (B, n)
        with torch.no_grad():
            logits, hidden = logits_and_hidden(self._model, seq, valid)
            old_logp = torch.log_softmax(logits[:, P - 1 :].float(), dim=-1).gather(
                -1, seq[:, P:].unsqueeze(-1)).squeeze(-1)  # (B, n)
            values = self.value_head(hidden[:, P - 1 :].float()).squeeze(-1).float() * rmask  # (B, n)
            ref_logp = token_logprobs(self.reference, seq, valid)[:, P - 1 :]  # (B, n)
            kl = ((old_logp - ref_logp) * rmask).sum(1)  # (B,): the estimate _kl() computes
            score = self.reward_model(seq, valid).float()  # (B,)
            rewards = -self.kl_coef * (old_logp - ref_logp) * rmask  # (B, n)
            last = (rmask.long().sum(1) - 1).clamp(min=0)  # index of each response's last token
            rewards[torch.arange(seq.shape[0], device=seq.device), last] += score
            adv, returns = gae(rewards, values, rmask, float(st.gamma), float(st.lam))
            adv = masked_whiten(adv, rmask)
        g = torch.Generator().manual_seed(derive_seed("ppo-minibatches", ctx.seed, step, ctx.rank) % 2**63)
        B = seq.shape[0]
        order = torch.stack([torch.randperm(B, generator=g) for _ in range(int(st.ppo_epochs))])  # (epochs, B)
        kl_mean, score_mean, length = self._global_mean(float(kl.mean()), float(score.mean()),
                                                        float(rmask.float().sum(1).mean()))
        return {"seq": seq, "valid": valid, "P": P, "old_logp": old_logp, "values": values, "adv": adv,
                "returns": returns, "order": order, "pos": 0, "batch_index": batch_index, "step": step,
                "kl": kl_mean, "reward_mean": score_mean, "response_length": length, "kl_coef": self.kl_coef}

    def _minibatch(self, buf: dict[str, Any]) -> torch.Tensor:
        """Row indices of the buffer's next minibatch; advances its position."""
        order = buf["order"]
        epochs, B = order.shape
        m = max(1, min(int(self.ctx.stage.minibatches), B))
        epoch, k = divmod(int(buf["pos"]), m)
        rows = torch.tensor_split(order[epoch], m)[k]
        buf["pos"] = int(buf["pos"]) + 1
        return rows

    @staticmethod
    def _exhausted(buf: dict[str, Any], minibatches: int) -> bool:
        epochs, B = buf["order"].shape
        return int(buf["pos"]) >= epochs * max(1, min(minibatches, B))

    def step(self, batch_index: int, step: int, mixture: dict[str, float], corrupt: bool = False,
             samples: list[int] | None = None) -> StepResult:
        ctx, st = self.ctx, self.ctx.stage
        self._rollout_kl = None
        if self.buffer is None:
            self.buffer = self._rollout(batch_index, step)
            self._rollout_kl = float(self.buffer["kl"])
        buf = self.buffer
        rows = self._minibatch(buf).to(buf["seq"].device)
        if self._exhausted(buf, int(st.minibatches)):
            self.buffer = None  # the next step starts a rollout
        P = int(buf["P"])
        seq, valid = buf["seq"][rows], buf["valid"][rows]
        rmask = valid[:, P:]
        m = rmask.float()
        n_tok = m.sum().clamp(min=1.0)
        old_logp, old_values = buf["old_logp"][rows], buf["values"][rows]
        adv, returns = buf["adv"][rows], buf["returns"][rows]
        if corrupt:
            adv = -adv
        self.value_head.zero_grad(set_to_none=True)
        logits, hidden = logits_and_hidden(self._model, seq, valid)
        logp_all = torch.log_softmax(logits[:, P - 1 :].float(), dim=-1)  # (b, n, V)
        logp = logp_all.gather(-1, seq[:, P:].unsqueeze(-1)).squeeze(-1)  # (b, n), with grad
        values = self.value_head(hidden[:, P - 1 :].float()).squeeze(-1).float()  # (b, n), with grad
        log_ratio = (logp - old_logp) * m
        ratio = torch.exp(log_ratio)
        eps = float(st.clip_eps)
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
        pg_loss = -(surrogate * m).sum() / n_tok
        v_clipped = old_values + (values - old_values).clamp(-float(st.value_clip), float(st.value_clip))
        value_loss = 0.5 * (torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2) * m).sum() / n_tok
        loss = pg_loss + float(st.vf_coef) * value_loss
        if float(st.ptx_coef) > 0:
            loss = loss + float(st.ptx_coef) * self._ptx_loss(batch_index, corrupt)
        with torch.no_grad():
            r = ratio.detach()
            lr_ = log_ratio.detach()
            entropy = -(logp_all.exp() * logp_all).sum(-1)  # (b, n)
            sel = rmask
            metrics = {
                "reward_mean": float(buf["reward_mean"]), "kl": float(buf["kl"]), "kl_coef": float(buf["kl_coef"]),
                "kl_target": float(st.kl_target), "response_length": float(buf["response_length"]),
                "ppo_ratio_mean": float((r * m).sum() / n_tok),
                "ppo_ratio_max": float(r[sel].max()) if bool(sel.any()) else 1.0,
                "ppo_clip_fraction": float((((r - 1.0).abs() > eps).float() * m).sum() / n_tok),
                "ppo_approx_kl": float((((r - 1.0) - lr_) * m).sum() / n_tok),
                "policy_entropy": float((entropy * m).sum() / n_tok),
                "value_loss": float(value_loss.detach()),
            }
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
        """The value head's update (its gradient averaged over the ranks, clipped like the
        policy's), and on a step that started a rollout the KL controller's update."""
        st = self.ctx.stage
        params = [p for p in self.value_head.parameters() if p.grad is not None]
        if params:
            if self.ctx.world_size > 1 and dist.is_available() and dist.is_initialized():
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                dist.all_reduce(flat)
                flat /= self.ctx.world_size
                o = 0
                for p in params:
                    n = p.grad.numel()
                    p.grad.copy_(flat[o : o + n].view_as(p.grad))
                    o += n
            torch.nn.utils.clip_grad_norm_(params, float(st.grad_clip))
            self.value_optimizer.step()
        self.value_head.zero_grad(set_to_none=True)
        if self._rollout_kl is not None:
            # once per rollout, over the global batch the KL was measured on
            self.kl_coef = kl_controller_update(self.kl_coef, self._rollout_kl, st.kl_target, st.batch_size,
                                                st.kl_horizon)
            self._rollout_kl = None

    def extra_state(self) -> dict[str, Any]:
        buf = None
        if self.buffer is not None:
            buf = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in self.buffer.items()}
        return {"kl_coef": self.kl_coef, "value_head": self.value_head.state_dict(),
                "value_optimizer": self.value_optimizer.state_dict(), "rollout": buf}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.kl_coef = float(state.get("kl_coef", self.kl_coef))
        if "value_head" in state:
            self.value_head.load_state_dict(state["value_head"])
        if state.get("value_optimizer"):
            self.value_optimizer.load_state_dict(state["value_optimizer"])
        buf = state.get("rollout")
        dev = self.ctx.device
        self.buffer = None if buf is None else {
            k: (v.to(dev) if isinstance(v, torch.Tensor) and k in _BUFFER_TENSORS and k != "order" else v)
            for k, v in buf.items()}
        self._rollout_kl = None

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
