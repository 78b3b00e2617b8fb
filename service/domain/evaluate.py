"""What the watch concludes from one stage's buffered signals: pure, no I/O.

`evaluate_stage(signals, cfg, now)` turns the per-step records of every rank into the
detectors' inputs and returns their findings, earliest onset first, at most one per kind.
`alert_finding(signals, kind, labels, cfg)` turns an Alertmanager alert into a finding: the
same detectors locate its onset in the buffers, else the current step is taken.

The supervisor's `ActiveStage` is the `StageSignals` passed in; `WatchConfig` holds every
detector's thresholds (documented defaults in the detector configs) and the recovery policy's.

Incremental: where a rank's records are a `RecordBuffer` (series.py) in step order, each
metric's samples come from the buffer (built once, as records arrive) and the detectors' exact
"cannot find anything" tests run on what the buffer tracks (rolling medians, per-sample spike
tests), so a healthy window is not rescanned every cycle; anything those tests cannot rule out
is scanned as before. A stage whose buffers did not change since a cycle that found nothing in
them (same `handled_until`) skips the sample-driven detectors (`eval_memo`); the GPU counters
and the hang check run every cycle. Any other `Sequence` of records is read as before.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence, Set as AbstractSet
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any, Protocol

from trainguard.service.domain import detectors
from trainguard.service.domain.detectors import Finding, IncidentKind
from trainguard.service.domain.policy import RecoveryConfig
from trainguard.service.domain.series import KeySeries, RecordBuffer, Sample

__all__ = ["WatchConfig", "StageSignals", "evaluate_stage", "alert_finding", "DEFAULT_STARTUP_GRACE_S",
           "GPU_COUNTERS"]

DEFAULT_STARTUP_GRACE_S = 300.0  # = the driver's group start deadline; 120 s was too short on a loaded machine
"""Seconds a new worker group may take to its first step before it counts as hung."""
GPU_COUNTERS = ("gpu_xid", "gpu_ecc")
"""The counters (as the metrics adapter names them) whose rise is a GPU fault."""
Record = Mapping[str, Any]


# Stages whose loss is a training loss meant to go down (a cross-entropy, or a user objective):
# the instability and validation-divergence detectors watch them. PPO's and DPO's objectives
# swing by design.
LOSS_CURVE_KINDS = frozenset({"pretrain", "anneal", "sft", "custom", "loop"})


@dataclass(frozen=True, kw_only=True)
class WatchConfig:
    loss_spike: detectors.LossSpikeConfig = field(default_factory=detectors.LossSpikeConfig)
    grad_explosion: detectors.GradExplosionConfig = field(default_factory=detectors.GradExplosionConfig)
    divergence: detectors.DivergenceConfig = field(default_factory=detectors.DivergenceConfig)
    instability: detectors.InstabilityConfig = field(default_factory=detectors.InstabilityConfig)
    nan: detectors.NanConfig = field(default_factory=detectors.NanConfig)
    val_divergence: detectors.ValDivergenceConfig = field(default_factory=detectors.ValDivergenceConfig)
    reward_hacking: detectors.RewardHackingConfig = field(default_factory=detectors.RewardHackingConfig)
    dpo_collapse: detectors.DpoCollapseConfig = field(default_factory=detectors.DpoCollapseConfig)
    policy_ratio: detectors.PolicyRatioConfig = field(default_factory=detectors.PolicyRatioConfig)
    negative_kl: detectors.NegativeKlConfig = field(default_factory=detectors.NegativeKlConfig)
    entropy_collapse: detectors.EntropyCollapseConfig = field(default_factory=detectors.EntropyCollapseConfig)
    response_length: detectors.ResponseLengthConfig = field(default_factory=detectors.ResponseLengthConfig)
    value_loss: detectors.ValueLossConfig = field(default_factory=detectors.ValueLossConfig)
    hang: detectors.HangConfig = field(default_factory=detectors.HangConfig)
    straggler: detectors.StragglerConfig = field(default_factory=detectors.StragglerConfig)
    gpu: detectors.GpuFaultConfig = field(default_factory=detectors.GpuFaultConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    startup_grace: float = DEFAULT_STARTUP_GRACE_S
    """Seconds a new worker group may take to its first step before it counts as hung."""
    sparse: bool = False
    """Series come from Prometheus scrapes (several steps apart): a guard-counted loss spike
    between two scrapes is a finding on its own, since the spike detector may see one sample."""

    @classmethod
    def from_settings(cls, settings: Any) -> "WatchConfig":
        """The deployment's overrides (service/config.py `Settings`): hang timeout and idle floor, start-up grace,
        Prometheus as the source. Every other threshold keeps its documented default."""
        return cls(hang=replace(detectors.HangConfig(), timeout_s=float(settings.hang_timeout),
                                idle_floor_s=float(settings.hang_idle_floor)),
                   startup_grace=float(settings.startup_grace), sparse=bool(settings.prometheus_url))


class StageSignals(Protocol):
    """What the watch has buffered about one running stage (the supervisor's ActiveStage)."""

    @property
    def kind(self) -> str: ...
    @property
    def records(self) -> Mapping[int, Sequence[Record]]: ...  # rank -> per-step records, oldest first
    @property
    def handled_until(self) -> Mapping[str, int]: ...  # kind -> step of the last episode handled: detect only later ones
    @property
    def counter_series(self) -> Mapping[tuple[int, str], Sequence[Sample]]: ...  # (rank, counter) -> changes
    @property
    def heartbeat(self) -> Mapping[int, float]: ...  # rank -> unix time of its last finished step
    @property
    def paused_ranks(self) -> AbstractSet[int]: ...
    @property
    def last_step(self) -> int: ...
    @property
    def started_at(self) -> float: ...
    @property
    def resumed_at(self) -> float: ...
    @property
    def ranks(self) -> Sequence[int]: ...
    @property
    def steps(self) -> int: ...  # the stage's last step
    @property
    def idle(self) -> Mapping[int, float]: ...  # rank -> seconds its process has been idle (only ranks idle now)


def _samples(records: Sequence[Record], key: str) -> list[Sample]:
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


def _anomaly_series(records: Sequence[Record]) -> dict[str, list[Sample]]:
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


def _earliest(findings: list[Finding | None]) -> Finding | None:
    found = [f for f in findings if f is not None]
    return min(found, key=lambda f: f.onset_step) if found else None


class _Rank:
    """One rank's records as the detectors read them: from its RecordBuffer's kept series when
    the buffer is in step order (`buf`), else from the records, as `_samples` reads them."""

    __slots__ = ("records", "buf", "_list")

    def __init__(self, records: Sequence[Record]) -> None:
        self.records = records
        self.buf = records if isinstance(records, RecordBuffer) and records.ordered else None
        self._list: list[Record] | None = None

    def all(self) -> list[Record]:
        if self._list is None:
            self._list = list(self.records)
        return self._list

    def series(self, key: str) -> KeySeries | None:
        if self.buf is None:
            return None
        ks = self.buf.key_series(key)
        return ks if ks.usable else None

    def samples(self, key: str) -> list[Sample]:
        ks = self.series(key)
        return ks.samples() if ks is not None else _samples(self.all(), key)

    def lazy(self, key: str) -> Iterable[Sample]:
        """`samples(key)`, made only if read (from kept series)."""
        ks = self.series(key)
        return ks.iter_samples() if ks is not None else _samples(self.all(), key)


def evaluate_stage(signals: StageSignals, cfg: WatchConfig, *, now: float,
                   handled_until: Mapping[str, int] | None = None) -> list[Finding]:
    """Findings for one running stage, earliest onset first; at most one per kind. Only
    episodes after `handled_until[kind]` (default: the stage's) count."""
    after = signals.handled_until if handled_until is None else handled_until
    out = _sample_findings(signals, cfg, after)
    for f in (_gpu_fault(signals, cfg, after.get("gpu_fault")), _hang(signals, cfg, now)):
        if f is not None:
            out.append(f)
    return sorted(out, key=lambda f: f.onset_step)


def _sample_findings(signals: StageSignals, cfg: WatchConfig, after: Mapping[str, int]) -> list[Finding]:
    """The detectors that read the buffered records; skipped when the stage's `eval_memo` (a dict,
    where it has one) holds what they found in exactly these buffers, with this `after` (a paused
    run's unhandled finding is not scanned for again every cycle)."""
    memo = getattr(signals, "eval_memo", None)
    ranks = sorted(signals.records)
    bufs = tuple(b for r in ranks if isinstance(b := signals.records[r], RecordBuffer))
    key: tuple[Any, ...] | None = None
    if isinstance(memo, dict) and len(bufs) == len(ranks):
        key = (tuple(ranks), tuple(b.version for b in bufs), tuple(sorted(after.items())), signals.kind)
        if memo.get("key") == key and memo.get("cfg") is cfg and all(
                a is b for a, b in zip(memo.get("bufs", ()), bufs)):
            return list(memo["found"])
    found = _scan(signals, cfg, after)
    if key is not None and isinstance(memo, dict):
        memo.clear()
        memo.update(key=key, cfg=cfg, bufs=bufs, found=list(found))  # the scan is a function of the key
    return found


def _scan(signals: StageSignals, cfg: WatchConfig, after: Mapping[str, int]) -> list[Finding]:
    ranks = sorted(signals.records)
    views = {r: _Rank(signals.records[r]) for r in ranks}
    out: list[Finding] = []

    def add(f: Finding | None) -> None:
        if f is not None:
            out.append(f)

    add(_earliest([_nan(views[r], cfg.nan, after.get("nan")) for r in ranks]))
    add(_earliest([_excursion(views[r], "loss", cfg.loss_spike, after.get("loss_spike"), detectors.detect_loss_spike)
                   for r in ranks]))
    add(_earliest([_excursion(views[r], "grad_norm", cfg.grad_explosion, after.get("grad_explosion"),
                              detectors.detect_grad_explosion) for r in ranks]))
    add(_earliest([_divergence(views[r], cfg.divergence, after.get("divergence")) for r in ranks[:1]]))
    if signals.kind in LOSS_CURVE_KINDS:
        add(_earliest([_instability(views[r], cfg.instability, after.get("instability")) for r in ranks[:1]]))
    if 0 in views:
        for kind_finding in _stage_kind_findings(signals.kind, views[0], cfg, after):
            add(kind_finding)
    if cfg.sparse:
        add(_earliest([_guard(views[r], after.get("loss_spike")) for r in ranks]))
    if len(ranks) > 1:
        # compute time (before the gradient all-reduce): wall-clock step time is equal on all ranks,
        # since the fast ones wait for the straggler in the collective
        first = signals.records[ranks[0]]
        last3 = [first[i] for i in range(-min(3, len(first)), 0)]
        key = "compute_seconds" if any("compute_seconds" in r for r in last3) else "step_seconds"
        f = detectors.detect_straggler(_straggler_input(views, ranks, key, cfg.straggler), cfg.straggler)
        if f is not None and f.onset_step > after.get("straggler", -1):
            add(f)
    return out


# ---- each detector: the exact quick test on what the buffer tracks, else the scan -----------------


def _nan(v: _Rank, cfg: detectors.NanConfig, after: int | None) -> Finding | None:
    if v.buf is not None:
        loss, grad = v.series("loss"), v.series("grad_norm")
        # nothing non-finite and no anomaly record of a counted kind: no event to find
        if (loss is not None and grad is not None and not loss.nonfinite and not grad.nonfinite
                and not v.buf.has_anomaly(cfg.anomaly_kinds)):
            return None
    return detectors.detect_nan(v.samples("loss"), v.samples("grad_norm"), _anomaly_series(v.all()), cfg, after=after)


def _excursion(v: _Rank, key: str, cfg: detectors.LossSpikeConfig, after: int | None,
               detect: Callable[..., Finding | None]) -> Finding | None:
    ks = v.series(key)
    if ks is not None and ks.tracker(("excursion", cfg), lambda: detectors.ExcursionTrack(cfg)).quiet():
        return None
    return detect(v.samples(key), cfg, after=after)


def _median_track(ks: KeySeries, n: int) -> detectors.MedianTrack:
    return ks.tracker(("median", n), lambda: detectors.MedianTrack(n))


def _divergence(v: _Rank, cfg: detectors.DivergenceConfig, after: int | None) -> Finding | None:
    ks = v.series("loss")
    if ks is not None and detectors.divergence_ruled_out(_median_track(ks, cfg.window).full(), cfg):
        return None
    return detectors.detect_divergence(v.samples("loss"), cfg, after=after)


def _instability(v: _Rank, cfg: detectors.InstabilityConfig, after: int | None) -> Finding | None:
    ks = v.series("loss")
    if ks is not None:
        h = cfg.min_history - 1  # the scan's first sample with a best
        smoothed = list(islice(_median_track(ks, cfg.smooth).medians, h, None))
        long = list(islice(_median_track(ks, cfg.best_smooth).medians, h, None))
        if detectors.instability_ruled_out(smoothed, long, cfg):
            return None
    return detectors.detect_instability(v.samples("loss"), v.samples("lr"), cfg, after=after)


def _guard(v: _Rank, after: int | None) -> Finding | None:
    if v.buf is not None and not v.buf.has_anomaly(("loss_spike", "grad_spike")):
        return None
    return _guard_spike(v.all(), after)


def _straggler_input(views: Mapping[int, _Rank], ranks: Sequence[int], key: str,
                     cfg: detectors.StragglerConfig) -> dict[int, list[Sample]]:
    """Each rank's `key` samples for detect_straggler: from kept series, only the tail it reads
    (a rank's last `window` samples, and every rank's samples from the earliest step such a
    window starts at: the same finding as from the whole series); else the whole series."""
    kept = {r: views[r].series(key) for r in ranks}
    if any(ks is None or ks.nonfinite for ks in kept.values()):
        return {r: views[r].samples(key) for r in ranks}
    steps = {r: ks.steps for r, ks in kept.items() if ks is not None}
    starts = [xs[-min(cfg.window, len(xs))] for xs in steps.values() if xs]
    if not starts:
        return {r: [] for r in ranks}
    since = min(starts)
    out: dict[int, list[Sample]] = {}
    for r, ks in kept.items():
        assert ks is not None
        xs = ks.steps
        k = min(cfg.window, len(xs))
        while k < len(xs) and xs[-k - 1] >= since:
            k += 1
        out[r] = ks.samples(len(xs) - k)
    return out


def _stage_kind_findings(kind: str, r0: _Rank, cfg: WatchConfig, after: Mapping[str, int]) -> list[Finding]:
    """The detectors that only make sense for some stage kinds (rank 0's series); at most one
    finding per kind."""
    found: list[Finding | None] = []
    if kind in LOSS_CURVE_KINDS:
        found.append(detectors.detect_val_divergence(r0.samples("val_loss"), r0.lazy("loss"), cfg.val_divergence,
                                                     after=after.get("val_divergence")))
    elif kind == "ppo":
        kl = r0.samples("kl")
        found += [
            detectors.detect_reward_hacking(r0.samples("reward_mean"), kl, r0.samples("kl_target") or None,
                                            cfg.reward_hacking, after=after.get("reward_hacking")),
            detectors.detect_policy_ratio(r0.samples("ppo_ratio_mean"), r0.samples("ppo_clip_fraction"),
                                          cfg.policy_ratio, after=after.get("policy_ratio")),
            detectors.detect_negative_kl(kl, cfg.negative_kl, after=after.get("negative_kl")),
            detectors.detect_entropy_collapse(r0.samples("policy_entropy"), cfg.entropy_collapse,
                                              after=after.get("entropy_collapse")),
            detectors.detect_response_length(r0.samples("response_length"), cfg.response_length,
                                             after=after.get("response_length")),
            detectors.detect_value_loss_explosion(r0.samples("value_loss"), cfg.value_loss,
                                                  after=after.get("value_loss_explosion")),
        ]
    elif kind == "dpo":
        found.append(detectors.detect_dpo_collapse(r0.samples("dpo_chosen_logprob"), r0.samples("dpo_reward_margin"),
                                                   cfg.dpo_collapse, after=after.get("dpo_collapse")))
    return [f for f in found if f is not None]


def _guard_spike(records: Sequence[Record], after: int | None) -> Finding | None:
    """The worker's guard counted a loss/grad spike between two scrapes (sparse series only)."""
    for r in records:
        if r.get("anomaly") in ("loss_spike", "grad_spike"):
            # The spike began somewhere in (previous scrape, this scrape]. Taking the latest
            # possible onset makes the skip reach far enough past the bad data; the rollback
            # target stays safe because checkpoints saved with anomalies in their window are
            # not healthy.
            onset = int(r["step"])
            if after is None or onset > after:
                return Finding(IncidentKind.LOSS_SPIKE.value, onset, onset,
                               {"source": "guard counter", "anomaly": r["anomaly"], "step": r["step"],
                                "earliest_onset": r.get("anomaly_since"), "loss": r.get("loss"),
                                "end_step": None})
    return None


def _gpu_fault(signals: StageSignals, cfg: WatchConfig, after: int | None) -> Finding | None:
    """A GPU error counter rose since the group started (detect_gpu_fault over each rank's
    counter changes, named "<counter>/rank<r>")."""
    series = {f"{key}/rank{rank}": xs for (rank, key), xs in sorted(signals.counter_series.items())
              if key in GPU_COUNTERS}
    return detectors.detect_gpu_fault(series, cfg.gpu, after=after) if series else None


def _hang(signals: StageSignals, cfg: WatchConfig, now: float) -> Finding | None:
    if signals.paused_ranks or not signals.ranks:
        return None
    # time paused by an operator is not time without a step: a rank's clock restarts at the resume
    beats = {r: Sample(int(signals.records[r][-1]["step"]) if signals.records.get(r) else 0, b, b)
             for r, t in signals.heartbeat.items() for b in [max(t, signals.resumed_at)]}
    for rank in signals.ranks:  # a rank that never finished a step: counted from the group's start
        if rank not in beats and now - signals.started_at > cfg.startup_grace:
            beats[rank] = Sample(0, signals.started_at, signals.started_at)
    if not beats:
        return None
    # the idle signal only while steps remain: a group past its last step waits for its driver
    idle = signals.idle if all(b.step < signals.steps for b in beats.values()) else None
    # the threshold comes from the gaps between rank 0's steps, never across a group start or a resume
    return detectors.detect_hang(beats, now, cfg.hang, gaps=lambda: detectors.step_gaps(
        signals.records.get(0, ()), breaks=(signals.started_at, signals.resumed_at)), idle=idle)


def alert_finding(signals: StageSignals, kind: str, labels: Mapping[str, str], cfg: WatchConfig) -> Finding | None:
    """An alert names a kind; find its onset in the buffered series (the same detectors, every
    episode considered), or take the current step when the buffers cannot tell. None for the
    alerts that are for people, not for recovery (needs_attention, supervisor_down, ...)."""
    try:
        kind = IncidentKind(kind).value
    except ValueError:
        return None
    step = max(signals.last_step, 0)
    found = [f for f in evaluate_stage(signals, cfg, now=math.inf if kind == "hang" else 0.0, handled_until={})
             if f.kind == kind]
    evidence = {"alert_labels": dict(labels)}
    if found:
        f = found[-1]
        return Finding(f.kind, f.onset_step, f.detected_at_step, {**f.evidence, **evidence})
    return Finding(kind, step, step, evidence)

