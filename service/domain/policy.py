"""Recovery policy: what to do about an incident, as a pure function of plain data.

`decide(incident, snapshot, cfg) -> Decision` implements DESIGN.md "Recovery
semantics"; the controller carries the decision out and records it as an
`Attempt` (and in the source's budget) so the next decision sees it.

Per incident kind:

| kind | action |
|---|---|
| loss_spike, divergence, nan, grad_explosion | ROLLBACK to the newest good checkpoint >= `margin` steps before the onset; skip batches [checkpoint cursor, onset batch + skip_after); LR x `lr_backoff`. The same region again: skip widened x `widen_factor` per attempt, LR lowered again; after `max_attempts` NEEDS_ATTENTION |
| reward_hacking, dpo_collapse | ROLLBACK as above with the LR backoff but no skip: PPO/DPO drift is not caused by particular batches, a lower LR is what helps |
| policy_ratio, entropy_collapse, response_length, value_loss_explosion | ROLLBACK as above, no skip, LR x `lr_backoff`: PPO updates that were too drastic (ratio, clip fraction), a policy collapsing onto one answer or one length while it exploits the reward model, a critic that cannot follow the returns: all driven by the step size, not by particular prompts |
| negative_kl | NOTIFY: the responses are not sampled from the policy (a configuration fault); a rollback would replay it |
| instability | ROLLBACK as above, no skip, LR x `lr_backoff` (the loss oscillating above its best while the LR is high: the LR is the cause, not the data); NOTIFY instead when `instability_action` is "notify" |
| worker_lost, node_lost, hang | RESTART from the newest good checkpoint; no skip, no LR change (node_lost: on the capacity left; no spare that lived on the lost node) |
| gpu_fault | RESTART from the newest good checkpoint saved before the onset (the GPU may have computed garbage since) |
| straggler | NOTIFY: nothing is wrong with the model; an operator may drain the node |
| val_divergence | NOTIFY, naming the checkpoint with the best validation loss (checkpoint_step) for the controller to tag "keep" |
| insufficient_resources | NEEDS_ATTENTION: the stage's worker group could not be placed (its placement group was not ready within the wait); the evidence names what was asked and what is free. Waiting longer is the placement wait's job and an automatic retry would only hold a half-reserved cluster again; an operator frees capacity (or adds nodes) and resumes — the stage restarts from its newest good checkpoint. Spends no budget |

Budgets are counted per source ("spike", "worker", "hang", "gpu"; -1 = unlimited);
an exhausted budget means NEEDS_ATTENTION. With no good checkpoint at all,
`checkpoint_step` is None: restart the stage from its input (the previous stage's
output), skip ranges then count from batch 0.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trainguard.service.domain.detectors import IncidentKind

__all__ = [
    "Action",
    "RecoveryConfig",
    "CheckpointInfo",
    "Attempt",
    "RunSnapshot",
    "Decision",
    "decide",
    "operator_rollback",
    "recovery_lr",
    "in_effect",
    "is_good_checkpoint",
    "newest_good_checkpoint",
    "budget_source",
    "batch_at_step",
    "dedup_key",
    "ROLLBACK_KINDS",
    "NO_SKIP_ROLLBACK_KINDS",
    "RESTART_KINDS",
    "NOTIFY_KINDS",
    "ATTENTION_KINDS",
]

K = IncidentKind
ROLLBACK_KINDS = frozenset({K.LOSS_SPIKE.value, K.DIVERGENCE.value, K.NAN.value, K.GRAD_EXPLOSION.value})
NO_SKIP_ROLLBACK_KINDS = frozenset({K.REWARD_HACKING.value, K.DPO_COLLAPSE.value, K.INSTABILITY.value,
                                    K.POLICY_RATIO.value, K.ENTROPY_COLLAPSE.value, K.RESPONSE_LENGTH.value,
                                    K.VALUE_LOSS_EXPLOSION.value})
RESTART_KINDS = frozenset({K.WORKER_LOST.value, K.NODE_LOST.value, K.HANG.value, K.GPU_FAULT.value})
NOTIFY_KINDS = frozenset({K.STRAGGLER.value, K.VAL_DIVERGENCE.value, K.NEGATIVE_KL.value})
ATTENTION_KINDS = frozenset({K.INSUFFICIENT_RESOURCES.value})

_SOURCE = {
    **{k: "spike" for k in ROLLBACK_KINDS | NO_SKIP_ROLLBACK_KINDS},
    K.WORKER_LOST.value: "worker",
    K.NODE_LOST.value: "worker",
    K.HANG.value: "hang",
    K.GPU_FAULT.value: "gpu",
}


class Action(str, enum.Enum):
    ROLLBACK = "rollback"  # load a checkpoint into the live worker group (or restart from it), with skip + LR
    RESTART = "restart"  # new worker group from a checkpoint, same data and LR
    NOTIFY = "notify"  # record and alert; training goes on
    NEEDS_ATTENTION = "needs_attention"  # pause the run and alert an operator
    IGNORE = "ignore"  # nothing to do (the run is not in a state to act on)


def _default_budgets() -> dict[str, int]:
    return {"spike": 10, "worker": 5, "hang": 5, "gpu": 3}


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryConfig:
    """How the supervisor recovers. Defaults suit the small demo pipelines (checkpoints
    every 20 steps); at scale PaLM/OPT used a margin of ~100 steps and skipped 200-500 batches."""

    margin: int = 10
    """Steps the rollback checkpoint must precede the onset by."""
    skip_after: int = 20
    """Batches past the onset batch that are skipped too (the bad data is often a stretch)."""
    lr_backoff: float = 0.5
    """LR multiplier applied on each rollback (compounding over attempts in the same region)."""
    max_attempts: int = 3
    """Rollbacks in one region before the run is paused in needs_attention."""
    widen_factor: int = 2
    """Each repeat in the same region multiplies `skip_after` by this."""
    region_steps: int | None = None
    """Two onsets within this many steps are the same region (None: margin + skip_after)."""
    budgets: dict[str, int] = field(default_factory=_default_budgets)
    """Recoveries allowed per source over the run's life: spike, worker, hang, gpu; -1 = unlimited."""
    checkpoint_max_spike_score: float | None = None
    """A checkpoint whose saved metrics carry a spike_score above this is not good (None: not checked)."""
    instability_action: str = "rollback"
    """What a sustained instability gets: "rollback" (to a good checkpoint before it, LR x
    `lr_backoff`, no skip) or "notify" (recorded and alerted; an operator decides)."""

    def __post_init__(self) -> None:
        if self.margin < 0 or self.skip_after < 0:
            raise ValueError(f"margin ({self.margin}) and skip_after ({self.skip_after}) must be >= 0")
        if not 0 < self.lr_backoff <= 1:
            raise ValueError(f"lr_backoff must be in (0, 1], got {self.lr_backoff}")
        if self.max_attempts < 1 or self.widen_factor < 1:
            raise ValueError("max_attempts and widen_factor must be >= 1")
        if self.instability_action not in ("rollback", "notify"):
            raise ValueError(f"instability_action must be 'rollback' or 'notify', got {self.instability_action!r}")
        if self.region_steps is not None and self.region_steps < 0:
            raise ValueError("region_steps must be >= 0")
        for src, n in self.budgets.items():
            if src not in ("spike", "worker", "hang", "gpu"):
                raise ValueError(f"budgets: unknown source {src!r} (known: spike, worker, hang, gpu)")
            if n < -1:
                raise ValueError(f"budgets.{src} must be -1 (unlimited) or >= 0, got {n}")

    @property
    def region(self) -> int:
        return self.region_steps if self.region_steps is not None else self.margin + self.skip_after


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointInfo:
    """What the policy needs to know about one checkpoint (from its manifest and state.json)."""

    step: int
    batch_cursor: int
    """Next batch index at this checkpoint (state.json / manifest `batch_cursor`)."""
    verified: bool = True
    """Trusted as far as the supervisor knows: rank 0 reported it with the digest of every file,
    and no verification since (the catalog's scans, a check before a use) found a recorded file
    missing or different. Not a fresh check: the caller verifies again right before a use."""
    healthy: bool = True
    """The manifest's `healthy` flag."""
    anomalies_in_window: int = 0
    """The manifest's `anomalies_in_window`: guard anomalies in the window before the save."""
    created_step: int | None = None
    """Step the run had reached when the (asynchronous) write finished; informational."""
    metrics: Mapping[str, float] = field(default_factory=dict)
    """The manifest's metrics at save time (train_loss, val_loss, grad_norm, spike_score)."""
    lr_multiplier: float = 1.0
    """LR multiplier in effect when it was saved (state.json)."""
    ref: str | None = None
    """Opaque id or path for the controller."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """An earlier recovery of this run stage, as the controller recorded it."""

    kind: str
    onset_step: int
    action: str = Action.ROLLBACK.value
    checkpoint_step: int | None = None
    lr_multiplier: float = 1.0
    """Absolute LR multiplier the run had after this attempt."""
    skip: Sequence[tuple[int, int]] = ()
    """Batch ranges this attempt added to the skip list."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSnapshot:
    """The run stage as the policy sees it."""

    checkpoints: Sequence[CheckpointInfo] = ()
    attempts: Sequence[Attempt] = ()
    """Earlier recoveries of this stage (all of them; the policy picks the same region)."""
    budgets_used: Mapping[str, int] = field(default_factory=dict)
    """Recoveries so far per source."""
    skip: Sequence[tuple[int, int]] = ()
    """The run's current skip list (half-open batch-index ranges)."""
    batch_index_at: Mapping[int, int] = field(default_factory=dict)
    """Known step -> batch index (from the per-step history); computed from a checkpoint otherwise."""


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do. `checkpoint_step`: the checkpoint to roll back / restart from (None: the
    stage's input), or for NOTIFY of val_divergence the one to keep. `lr_multiplier`
    multiplies the LR multiplier stored in that checkpoint (the rollback control's
    payload); `lr_target` is the resulting absolute multiplier."""

    action: Action
    reason: str
    checkpoint_step: int | None = None
    checkpoint_ref: str | None = None
    skip: list[tuple[int, int]] = field(default_factory=list, hash=False)
    lr_multiplier: float = 1.0
    lr_target: float | None = None
    attempt: int = 0
    """1-based attempt number in this region (0 when not a rollback)."""
    source: str | None = None
    """Budget source this decision draws on (None for NOTIFY / IGNORE)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action.value,
            "reason": self.reason,
            "checkpoint_step": self.checkpoint_step,
            "checkpoint_ref": self.checkpoint_ref,
            "skip": [list(r) for r in self.skip],
            "lr_multiplier": self.lr_multiplier,
            "lr_target": self.lr_target,
            "attempt": self.attempt,
            "source": self.source,
        }


# --------------------------------------------------------------------------- checkpoints


def is_good_checkpoint(ck: CheckpointInfo, cfg: RecoveryConfig, before_step: int | None = None) -> bool:
    """Complete, healthy when saved, finite saved metrics, no anomaly in its window, and
    (when `before_step` is given) saved strictly before it."""
    if not (ck.verified and ck.healthy) or ck.anomalies_in_window > 0:
        return False
    if any(isinstance(v, float) and not math.isfinite(v) for v in ck.metrics.values()):
        return False
    score = ck.metrics.get("spike_score")
    if cfg.checkpoint_max_spike_score is not None and score is not None and score > cfg.checkpoint_max_spike_score:
        return False
    return before_step is None or ck.step < before_step


def newest_good_checkpoint(
    checkpoints: Sequence[CheckpointInfo], cfg: RecoveryConfig, before_step: int | None = None
) -> CheckpointInfo | None:
    good = [c for c in checkpoints if is_good_checkpoint(c, cfg, before_step)]
    return max(good, key=lambda c: c.step) if good else None


def batch_at_step(step: int, snapshot: RunSnapshot, ck: CheckpointInfo | None) -> int:
    """Batch index step `step` consumed: from the history when known, else walked forward
    from the checkpoint's cursor (step `ck.step` takes the cursor) over the skip list."""
    if step in snapshot.batch_index_at:
        return snapshot.batch_index_at[step]
    cursor, from_step = (ck.batch_cursor, ck.step) if ck is not None else (0, 0)
    ranges = sorted(snapshot.skip)

    def skip_past(b: int) -> int:
        for a, e in ranges:
            if a <= b < e:
                b = e
        return b

    b = skip_past(cursor)
    for _ in range(max(step - from_step, 0)):
        b = skip_past(b + 1)
    return b


# --------------------------------------------------------------------------- decisions


def budget_source(kind: str) -> str | None:
    """Budget source of an incident kind, or None when acting on it spends no budget."""
    return _SOURCE.get(str(kind))


def _budget(source: str, snapshot: RunSnapshot, cfg: RecoveryConfig) -> tuple[int, int, bool]:
    used = int(snapshot.budgets_used.get(source, 0))
    limit = int(cfg.budgets.get(source, -1))
    return used, limit, limit != -1 and used >= limit


def _limit_text(limit: int) -> str:
    return "unlimited" if limit == -1 else str(limit)


def decide(incident: Any, snapshot: RunSnapshot, cfg: RecoveryConfig = RecoveryConfig()) -> Decision:
    """The recovery for `incident` (anything with `kind` and `onset_step`, e.g. a Finding)."""
    kind = getattr(incident.kind, "value", incident.kind)
    onset = int(incident.onset_step)
    if kind not in ROLLBACK_KINDS | NO_SKIP_ROLLBACK_KINDS | RESTART_KINDS | NOTIFY_KINDS | ATTENTION_KINDS:
        raise ValueError(f"unknown incident kind {kind!r}")
    if kind == K.INSUFFICIENT_RESOURCES.value:
        return Decision(Action.NEEDS_ATTENTION,
                        f"insufficient_resources at step {onset}: the worker group could not be placed in time; "
                        f"free capacity (or add nodes), then resume the run")
    if kind in NOTIFY_KINDS:
        return _notify(kind, onset, snapshot, cfg)
    if kind == K.INSTABILITY.value and cfg.instability_action == "notify":
        return Decision(Action.NOTIFY, f"instability since step {onset}: the loss keeps oscillating well above its best "
                                       f"while the LR is high; consider a rollback with a lower LR")

    source = _SOURCE[kind]
    used, limit, exhausted = _budget(source, snapshot, cfg)
    budget_text = f"{source} budget {used + 1}/{_limit_text(limit)}"
    if exhausted:
        return Decision(
            Action.NEEDS_ATTENTION,
            f"{kind} at step {onset}: {source} recovery budget exhausted ({used}/{limit}); pausing for an operator",
            source=source,
        )
    if kind in RESTART_KINDS:
        return _restart(kind, onset, snapshot, cfg, source, budget_text)
    return _rollback(kind, onset, snapshot, cfg, source, budget_text)


def _notify(kind: str, onset: int, snapshot: RunSnapshot, cfg: RecoveryConfig) -> Decision:
    if kind == K.STRAGGLER.value:
        return Decision(Action.NOTIFY, f"straggler since step {onset}: training continues; consider draining the node")
    if kind == K.NEGATIVE_KL.value:
        return Decision(Action.NOTIFY, f"negative_kl since step {onset}: the KL estimate to the reference stays below 0, "
                                       f"so the responses are not sampled from the policy (temperature other than 1, "
                                       f"forced or banned tokens); fix the sampling: a rollback would not")
    good = [c for c in snapshot.checkpoints if is_good_checkpoint(c, cfg) and "val_loss" in c.metrics]
    best = min(good, key=lambda c: (c.metrics["val_loss"], -c.step)) if good else newest_good_checkpoint(snapshot.checkpoints, cfg, onset)
    keep = f"; keep checkpoint {best.step} (best validation loss)" if best is not None else ""
    return Decision(
        Action.NOTIFY,
        f"val_divergence at step {onset}: validation loss rising while train loss falls (overfitting){keep}",
        checkpoint_step=best.step if best else None,
        checkpoint_ref=best.ref if best else None,
    )


def _restart(kind: str, onset: int, snapshot: RunSnapshot, cfg: RecoveryConfig, source: str, budget_text: str) -> Decision:
    # A GPU fault may have corrupted what was computed since it began; a lost or hung worker has not.
    before = onset if kind == K.GPU_FAULT.value else None
    ck = newest_good_checkpoint(snapshot.checkpoints, cfg, before)
    where = f"checkpoint {ck.step}" if ck else "the stage input (no good checkpoint)"
    return Decision(
        Action.RESTART,
        f"{kind} at step {onset}: restart the worker group from {where}; no skip, no LR change; {budget_text}",
        checkpoint_step=ck.step if ck else None,
        checkpoint_ref=ck.ref if ck else None,
        lr_multiplier=1.0,
        lr_target=ck.lr_multiplier if ck else None,
        source=source,
    )


def _rollback(kind: str, onset: int, snapshot: RunSnapshot, cfg: RecoveryConfig, source: str, budget_text: str) -> Decision:
    region = [
        a
        for a in snapshot.attempts
        if a.action == Action.ROLLBACK.value and abs(a.onset_step - onset) <= cfg.region
    ]
    n = len(region)
    if n >= cfg.max_attempts:
        return Decision(
            Action.NEEDS_ATTENTION,
            f"{kind} at step {onset}: {n} rollbacks in this region already (limit {cfg.max_attempts}); pausing for an operator",
            source=source,
        )
    # Good = verified, healthy, and saved at least `margin` steps before the onset: a
    # checkpoint written while the spike was under way (step >= onset) never qualifies.
    ck = newest_good_checkpoint(snapshot.checkpoints, cfg, min(onset, onset - cfg.margin + 1))
    lr_target, lr_factor = recovery_lr(ck.lr_multiplier if ck else 1.0, cfg.lr_backoff,
                                       [a.lr_multiplier for a in region])
    skip: list[tuple[int, int]] = []
    skip_text = "no skip"
    if kind in ROLLBACK_KINDS:
        after = cfg.skip_after * cfg.widen_factor**n
        start = ck.batch_cursor if ck else 0
        end = batch_at_step(onset, snapshot, ck) + after + 1  # +1: the range is half-open, onset + skip_after included
        if end > start:
            skip = [(start, end)]
            skip_text = f"skip batches [{start}, {end})"
    where = f"checkpoint {ck.step}" if ck else "the stage input (no good checkpoint)"
    return Decision(
        Action.ROLLBACK,
        f"{kind} at step {onset}: roll back to {where} (>= {cfg.margin} steps before onset), {skip_text}, "
        f"LR x{lr_factor:g} (multiplier {lr_target:g}); attempt {n + 1}/{cfg.max_attempts} in this region; {budget_text}",
        checkpoint_step=ck.step if ck else None,
        checkpoint_ref=ck.ref if ck else None,
        skip=skip,
        lr_multiplier=lr_factor,
        lr_target=lr_target,
        attempt=n + 1,
        source=source,
    )


def recovery_lr(checkpoint_lr: float, factor: float, region_lrs: Sequence[float] = ()) -> tuple[float, float]:
    """The one place a recovery's LR multiplier is computed: (absolute multiplier, factor on the
    multiplier stored in the checkpoint it goes back to). The absolute one is `factor` times
    the lowest multiplier an earlier rollback in the same region reached (compounding), else
    times the checkpoint's own."""
    target = min(region_lrs, default=checkpoint_lr) * factor
    return target, (target / checkpoint_lr if checkpoint_lr > 0 else target)


def in_effect(attempts: Sequence[Attempt]) -> tuple[list[tuple[int, int]], float]:
    """The skip list and absolute LR multiplier a stage's (re)started worker group must apply:
    every rollback's skip ranges, and the newest rollback's multiplier (1.0 without one).
    `attempts` oldest first."""
    skip: list[tuple[int, int]] = []
    lr = 1.0
    for a in attempts:
        if a.action == Action.ROLLBACK.value:
            skip.extend((int(lo), int(hi)) for lo, hi in a.skip)
            lr = a.lr_multiplier
    return skip, lr


def operator_rollback(
    checkpoints: Sequence[CheckpointInfo], *, requested_step: int | None, skip: bool, factor: float | None,
    last_step: int, next_batch: int, cfg: RecoveryConfig = RecoveryConfig(),
) -> Decision:
    """An operator's rollback: to the checkpoint at `requested_step` (None: the newest good one
    before the current step). `skip`: never train again on the batches from the checkpoint's
    cursor to `next_batch` (the batch after the current step's); `factor` on the checkpoint's
    LR multiplier (None: the policy's `lr_backoff`). No budget is spent."""
    if requested_step is not None:
        ck = next((c for c in checkpoints if c.step == requested_step), None)
    else:
        ck = newest_good_checkpoint(checkpoints, cfg, last_step + 1)
    ranges = [(ck.batch_cursor, next_batch)] if skip and ck is not None and next_batch > ck.batch_cursor else []
    lr_target, lr_factor = recovery_lr(ck.lr_multiplier if ck else 1.0, cfg.lr_backoff if factor is None else factor)
    where = f"checkpoint {ck.step}" if ck else "the stage input"
    return Decision(
        Action.ROLLBACK,
        f"operator rollback to {where}, skip {[list(r) for r in ranges]}, LR multiplier {lr_target:g}",
        checkpoint_step=ck.step if ck else None,
        checkpoint_ref=ck.ref if ck else None,
        skip=ranges,
        lr_multiplier=lr_factor,
        lr_target=lr_target,
        attempt=1,
    )


def dedup_key(run_id: str, stage: str, kind: str, onset_step: int, bucket: int = 50, generation: int = 0) -> str:
    """Idempotency key for the incident store: one incident per (run, stage, kind, onset
    bucket). `generation` (recoveries of the stage so far) keeps a re-occurrence after a
    rollback, whose onset lands in the same bucket, from being swallowed as a duplicate."""
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1, got {bucket}")
    kind = getattr(kind, "value", kind)
    return f"{run_id}/{stage}/{kind}/g{generation}/b{onset_step // bucket}"
