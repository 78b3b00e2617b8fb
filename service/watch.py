"""Glue between the controller's buffers and the pure domain logic.

`evaluate_stage` turns an active stage's per-step records into the detectors'
inputs and returns their findings; `recovery_decision` builds the policy's
`RunSnapshot` from the store and returns the decision with the checkpoint path
the executor needs. The thresholds live in the domain configs (documented
defaults there); `WatchConfig.from_settings` applies deployment overrides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trainguard.service.db import crud
from trainguard.service.domain import detectors as D
from trainguard.service.domain.policy import (
    Action, Attempt, CheckpointInfo, RecoveryConfig, RunSnapshot, budget_source, decide,
)
from trainguard.service.domain.series import Sample

__all__ = ["WatchConfig", "evaluate_stage", "alert_finding", "recovery_decision"]


@dataclass(frozen=True, kw_only=True)
class WatchConfig:
    loss_spike: D.LossSpikeConfig = field(default_factory=D.LossSpikeConfig)
    grad_explosion: D.GradExplosionConfig = field(default_factory=D.GradExplosionConfig)
    divergence: D.DivergenceConfig = field(default_factory=D.DivergenceConfig)
    nan: D.NanConfig = field(default_factory=D.NanConfig)
    val_divergence: D.ValDivergenceConfig = field(default_factory=D.ValDivergenceConfig)
    reward_hacking: D.RewardHackingConfig = field(default_factory=D.RewardHackingConfig)
    dpo_collapse: D.DpoCollapseConfig = field(default_factory=D.DpoCollapseConfig)
    hang: D.HangConfig = field(default_factory=D.HangConfig)
    straggler: D.StragglerConfig = field(default_factory=D.StragglerConfig)
    gpu: D.GpuFaultConfig = field(default_factory=D.GpuFaultConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    startup_grace: float = 120.0
    """Seconds a new worker group may take to its first step before it counts as hung."""
    sparse: bool = False
    """Series come from Prometheus scrapes (several steps apart): a guard-counted loss spike
    between two scrapes is a finding on its own, since the spike detector may see one sample."""

    @classmethod
    def from_settings(cls, settings: Any) -> "WatchConfig":
        hang = D.HangConfig(timeout_s=float(getattr(settings, "hang_timeout", 120.0)))
        return cls(hang=hang, startup_grace=float(getattr(settings, "startup_grace", 120.0)),
                   sparse=bool(getattr(settings, "prometheus_url", None)))


def _samples(records: list[dict], key: str) -> list[Sample]:
    out = []
    for r in records:
        v = r.get(key)
        if v is None:
            continue
        try:
            out.append(Sample(int(r["step"]), float(v), float(r.get("time") or 0.0)))
        except (TypeError, ValueError):
            continue
    return out


def _anomaly_series(records: list[dict]) -> dict[str, list[Sample]]:
    """Cumulative count per anomaly kind, one sample per step (from the records' `anomaly` field)."""
    counts: dict[str, int] = {}
    out: dict[str, list[Sample]] = {}
    for r in records:
        kind = r.get("anomaly")
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
        for k, c in counts.items():
            out.setdefault(k, []).append(Sample(int(r["step"]), float(c), float(r.get("time") or 0.0)))
    return out


def _first(findings: list[D.Finding | None]) -> D.Finding | None:
    found = [f for f in findings if f is not None]
    return min(found, key=lambda f: f.onset_step) if found else None


def evaluate_stage(active: Any, cfg: WatchConfig, *, now: float) -> list[dict]:
    """Findings for one active stage, earliest onset first; at most one per kind."""
    ranks = sorted(active.records)
    recs = {r: list(active.records[r]) for r in ranks}
    after = active.after
    out: list[D.Finding] = []

    def add(f: D.Finding | None) -> None:
        if f is not None:
            out.append(f)

    add(_first([D.detect_nan(_samples(recs[r], "loss"), _samples(recs[r], "grad_norm"),
                             _anomaly_series(recs[r]), cfg.nan, after=after.get("nan")) for r in ranks]))
    add(_first([D.detect_loss_spike(_samples(recs[r], "loss"), cfg.loss_spike, after=after.get("loss_spike"))
                for r in ranks]))
    add(_first([D.detect_grad_explosion(_samples(recs[r], "grad_norm"), cfg.grad_explosion,
                                        after=after.get("grad_explosion")) for r in ranks]))
    add(_first([D.detect_divergence(_samples(recs[r], "loss"), cfg.divergence, after=after.get("divergence"))
                for r in ranks[:1]]))
    if 0 in recs:
        r0 = recs[0]
        if active.kind in ("sft", "pretrain", "anneal"):
            add(D.detect_val_divergence(_samples(r0, "val_loss"), _samples(r0, "loss"), cfg.val_divergence,
                                        after=after.get("val_divergence")))
        if active.kind == "ppo":
            add(D.detect_reward_hacking(_samples(r0, "reward_mean"), _samples(r0, "kl"),
                                        _samples(r0, "kl_target") or None, cfg.reward_hacking,
                                        after=after.get("reward_hacking")))
        if active.kind == "dpo":
            add(D.detect_dpo_collapse(_samples(r0, "dpo_chosen_logprob"), _samples(r0, "dpo_reward_margin"),
                                      cfg.dpo_collapse, after=after.get("dpo_collapse")))
    if cfg.sparse:
        add(_first([_guard_spike(recs[r], after.get("loss_spike")) for r in ranks]))
    if len(ranks) > 1:
        # compute time (before the gradient all-reduce): wall-clock step time is equal on all ranks,
        # since the fast ones wait for the straggler in the collective
        key = "compute_seconds" if any("compute_seconds" in r for r in recs[ranks[0]][-3:]) else "step_seconds"
        f = D.detect_straggler({r: _samples(recs[r], key) for r in ranks}, cfg.straggler)
        if f is not None and f.onset_step > after.get("straggler", -1):
            add(f)
    add(_gpu(active))
    add(_hang(active, cfg, now))
    return [f.to_dict() for f in sorted(out, key=lambda f: f.onset_step)]


def _guard_spike(records: list[dict], after: int | None) -> D.Finding | None:
    """The worker's guard counted a loss/grad spike between two scrapes (sparse series only)."""
    for r in records:
        if r.get("anomaly") in ("loss_spike", "grad_spike"):
            # The spike began somewhere in (previous scrape, this scrape]. Taking the latest
            # possible onset makes the skip reach far enough past the bad data; the rollback
            # target stays safe because checkpoints saved with anomalies in their window are
            # not healthy.
            onset = int(r["step"])
            if after is None or onset > after:
                return D.Finding(D.IncidentKind.LOSS_SPIKE.value, onset, onset,
                                 {"source": "guard counter", "anomaly": r["anomaly"], "step": r["step"],
                                  "earliest_onset": r.get("anomaly_since"), "loss": r.get("loss"),
                                  "end_step": None})
    return None


def _gpu(active: Any) -> D.Finding | None:
    for (rank, key), v in sorted(active.counters.items()):
        if key in ("gpu_xid", "gpu_ecc"):
            base = active.counter_base.get((rank, key), 0.0)
            if v > base:
                step = max(active.last_step, 0)
                return D.Finding(D.IncidentKind.GPU_FAULT.value, step, step,
                                 {"rank": rank, "counter": key, "from": base, "to": v, "end_step": None})
    return None


def _hang(active: Any, cfg: WatchConfig, now: float) -> D.Finding | None:
    if active.paused_ranks or not active.targets:
        return None
    # time paused by an operator is not time without a step: a rank's clock restarts at the resume
    beats = {r: Sample(int(active.records[r][-1]["step"]) if active.records.get(r) else 0, b, b)
             for r, t in active.heartbeat.items() for b in [max(t, active.resumed_at)]}
    for t in active.targets:  # a rank that never finished a step: counted from the group's start
        if t.rank not in beats and now - active.started_at > cfg.startup_grace:
            beats[t.rank] = Sample(0, active.started_at, active.started_at)
    if not beats:
        return None
    recent = [float(r["step_seconds"]) for r in list(active.records.get(0, []))[-20:] if r.get("step_seconds")]
    typical = sorted(recent)[len(recent) // 2] if recent else None
    return D.detect_hang(beats, now, cfg.hang, step_seconds=typical)


def alert_finding(active: Any, kind: str, labels: dict, cfg: WatchConfig) -> dict | None:
    """An alert names a kind; find its onset in the buffered series (the same detectors), or
    take the current step when the buffers cannot tell."""
    try:
        kind = D.IncidentKind(kind).value
    except ValueError:
        return None  # needs_attention, supervisor_down, low_goodput: for people, not for recovery
    step = max(active.last_step, 0)
    saved, active.after = active.after, {}
    try:
        found = [f for f in evaluate_stage(active, cfg, now=math.inf if kind == "hang" else 0.0)
                 if f["kind"] == kind]
    finally:
        active.after = saved
    evidence = {"alert_labels": labels}
    if found:
        f = found[-1]
        return {**f, "evidence": {**f["evidence"], **evidence}}
    return {"kind": kind, "onset_step": step, "detected_at_step": step, "evidence": evidence}


def recovery_decision(ctl: Any, run_id: str, active: Any, inc: Any, cfg: WatchConfig) -> dict:
    """The policy's decision for `inc`, with the checkpoint's path; operator rollbacks go to the
    named checkpoint (or the newest good one) and otherwise behave as automatic ones."""
    with ctl.session() as s:
        rows = crud.list_checkpoints(s, run_id=run_id, stage_name=active.name, include_deleted=False)
        history = [i for i in crud.list_incidents(s, run_id=run_id) if i.stage_name == active.name and i.id != inc.id]
    ckpts = [CheckpointInfo(
        step=c.step, batch_cursor=c.batch_cursor, verified=bool(c.verified and not c.bad_reason and c.files),
        healthy=bool(c.healthy), anomalies_in_window=int((c.metrics or {}).get("anomalies_in_window", 0) or 0),
        metrics={k: float(v) for k, v in (c.metrics or {}).items()
                 if isinstance(v, (int, float)) and k != "anomalies_in_window"},
        lr_multiplier=float((c.metrics or {}).get("lr_multiplier", 1.0) or 1.0), ref=c.path,
    ) for c in rows]
    done = [i for i in history if i.action in ("rollback", "restart")]
    attempts = [Attempt(kind=i.kind, onset_step=i.onset_step or 0, action=i.action,
                        checkpoint_step=i.rollback_to_step, lr_multiplier=float(i.lr_multiplier or 1.0))
                for i in done]
    used: dict[str, int] = {}
    for i in done:
        src = budget_source(i.kind)
        if src:
            used[src] = used.get(src, 0) + 1
    skip, _ = ctl._accumulated_recovery(run_id, active.name)
    batch_at = {int(r["step"]): int(r["batch_index"]) for r in active.records.get(0, []) if "batch_index" in r}
    snapshot = RunSnapshot(checkpoints=ckpts, attempts=attempts, budgets_used=used, skip=skip,
                           batch_index_at=batch_at, state=None)
    if inc.kind == "operator_rollback":
        return _operator_rollback(ckpts, inc, active, batch_at, cfg)
    d = decide(inc, snapshot, cfg.recovery)
    out = d.to_dict()
    out["checkpoint"] = d.checkpoint_ref
    if d.action == Action.ROLLBACK:
        out["lr_multiplier"] = d.lr_target if d.lr_target is not None else 1.0
    return out


def _operator_rollback(ckpts: list[CheckpointInfo], inc: Any, active: Any, batch_at: dict[int, int],
                       cfg: WatchConfig) -> dict:
    from trainguard.service.domain.policy import is_good_checkpoint

    evidence = inc.evidence or {}
    wanted = evidence.get("requested_checkpoint_step")
    if wanted is not None:
        ck = next((c for c in ckpts if c.step == wanted), None)
    else:
        good = [c for c in ckpts if is_good_checkpoint(c, cfg.recovery, active.last_step + 1)]
        ck = max(good, key=lambda c: c.step) if good else None
    cursor = batch_at.get(active.last_step, active.batch_cursor) + 1
    skip = ([[ck.batch_cursor, cursor]] if evidence.get("skip", True) and ck is not None and cursor > ck.batch_cursor
            else [])
    factor = evidence.get("lr_multiplier")
    lr = (ck.lr_multiplier if ck else 1.0) * (cfg.recovery.lr_backoff if factor is None else float(factor))
    return {"action": "rollback", "checkpoint": ck.ref if ck else None, "checkpoint_step": ck.step if ck else None,
            "skip": skip, "lr_multiplier": lr, "attempt": 1,
            "reason": f"operator rollback to {'checkpoint ' + str(ck.step) if ck else 'the stage input'}, "
                      f"skip {skip}, LR multiplier {lr:g}"}
