"""Detectors on liveness and hardware: hang (stale heartbeat), straggler (one slow rank),
worker lost (a dead rank in the group's status) and GPU fault (Xid / ECC error counters)."""
from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from trainguard.service.domain.detectors.base import Finding, IncidentKind, counter_increases, evidence_window, sorted_samples
from trainguard.service.domain.series import Sample, SampleLike

__all__ = [
    "HangConfig",
    "StragglerConfig",
    "GpuFaultConfig",
    "detect_hang",
    "detect_straggler",
    "detect_worker_lost",
    "detect_gpu_fault",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class HangConfig:
    """Hang: a rank's last-step heartbeat is older than the timeout."""

    timeout_s: float = 60.0
    """Seconds without a finished step before a rank counts as hung (the deployment's default
    too: Settings.hang_timeout takes it from here)."""
    step_time_factor: float = 10.0
    """With a typical step time given, the timeout is at least this many steps long (slow stages)."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.step_time_factor <= 0:
            raise ValueError("timeout_s and step_time_factor must be > 0")


def detect_hang(
    heartbeats: Mapping[int, Sample], now: float, cfg: HangConfig = HangConfig(), *, step_seconds: float | None = None
) -> Finding | None:
    """Ranks whose heartbeat is stale at `now` (unix seconds, the caller's clock).
    `heartbeats[rank]` = Sample(step=last finished step, value=its unix time — the gauge
    trainguard_last_step_timestamp_seconds). Do not call for paused runs."""
    timeout = cfg.timeout_s
    if step_seconds is not None and math.isfinite(step_seconds) and step_seconds > 0:
        timeout = max(timeout, cfg.step_time_factor * step_seconds)
    ages = {rank: now - hb.value for rank, hb in heartbeats.items()}
    hung = sorted(r for r, age in ages.items() if age > timeout)
    if not hung:
        return None
    step = min(heartbeats[r].step for r in hung)
    return Finding(
        IncidentKind.HANG.value,
        step,
        step,
        {
            "ranks": hung,
            "age_seconds": {str(r): ages[r] for r in hung},
            "threshold": timeout,
            "score": max(ages[r] for r in hung),
            "window": [[heartbeats[r].step, heartbeats[r].value] for r in hung],
            "end_step": None,
        },
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class StragglerConfig:
    """Straggler: one rank's median step time well above the other ranks'."""

    window: int = 32
    """Most recent step-time samples per rank in each median."""
    min_samples: int = 8
    """Samples a rank needs before it is compared."""
    factor: float = 1.5
    """Rank median > factor x median of the other ranks' medians..."""
    min_excess_s: float = 0.01
    """...by at least this many seconds (sub-millisecond jitter on tiny steps is not a straggler)."""

    def __post_init__(self) -> None:
        if self.factor <= 1 or self.window < 1 or self.min_samples < 1 or self.min_excess_s < 0:
            raise ValueError("factor must be > 1; window, min_samples >= 1; min_excess_s >= 0")


def detect_straggler(step_seconds: Mapping[int, Iterable[SampleLike]], cfg: StragglerConfig = StragglerConfig()) -> Finding | None:
    """The slowest straggling rank, from per-rank step-time samples (needs >= 2 ranks).
    Onset = first step of that rank's latest run of samples over the threshold."""
    recent = {r: [s for s in sorted_samples(xs) if math.isfinite(s.value)][-cfg.window :] for r, xs in step_seconds.items()}
    recent = {r: ss for r, ss in recent.items() if len(ss) >= cfg.min_samples}
    if len(recent) < 2:
        return None
    medians = {r: statistics.median(s.value for s in ss) for r, ss in recent.items()}
    worst = None
    for r, m in medians.items():
        others = statistics.median(v for q, v in medians.items() if q != r)
        thr = max(cfg.factor * others, others + cfg.min_excess_s)
        if m > thr and (worst is None or m / max(others, 1e-12) > worst[3]):
            worst = (r, others, thr, m / max(others, 1e-12))
    if worst is None:
        return None
    rank, others, thr, ratio = worst
    ss = recent[rank]
    o = len(ss) - 1
    while o > 0 and ss[o - 1].value > thr:
        o -= 1
    return Finding(
        IncidentKind.STRAGGLER.value,
        ss[o].step,
        ss[-1].step,
        {
            "rank": rank,
            "rank_median_s": medians[rank],
            "others_median_s": others,
            "threshold": thr,
            "score": ratio,
            "window": evidence_window(ss, 0, len(ss) - 1),
            "end_step": None,
        },
    )


def detect_worker_lost(status: Mapping[str, Any]) -> Finding | None:
    """Ranks that died, from `WorkerGroup.poll()`: {"state", "ranks": [{"rank", "step",
    "state", "alive", "error", "node", "node_alive"}], "failed_rank", "error"}. A rank that
    finished or was stopped is not lost; a group in state "failed" is. `node_lost` instead of
    `worker_lost` when a dead rank's Ray node is gone (`node_alive` False): the evidence names
    the nodes, and the restart must not count on anything that lived there."""
    ranks = list(status.get("ranks") or [])
    lost = [r for r in ranks if not r.get("alive", True) and r.get("state") not in ("finished", "stopped")]
    if not lost and status.get("state") == "failed":
        fr = status.get("failed_rank")
        lost = [r for r in ranks if r.get("rank") == fr] or ranks[:1] or [{"rank": fr, "step": None}]
    if not lost:
        return None
    steps = [int(r["step"]) for r in lost if r.get("step") is not None]
    step = min(steps) if steps else 0
    gone = sorted({str(r["node"]) for r in lost if r.get("node") and r.get("node_alive") is False})
    return Finding(
        (IncidentKind.NODE_LOST if gone else IncidentKind.WORKER_LOST).value,
        step,
        step,
        {
            **({"nodes": gone} if gone else {}),
            "ranks": [r.get("rank") for r in lost],
            "errors": {str(r.get("rank")): r.get("error") for r in lost if r.get("error")},
            "group_error": status.get("error"),
            "window": [[r.get("step"), 0.0] for r in lost],
            "end_step": None,
        },
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuFaultConfig:
    """GPU fault: an Xid or ECC error counter (trainguard_gpu_*_errors_total) increased."""

    min_increase: int = 1
    """Increase, summed over all counters, that makes an incident."""

    def __post_init__(self) -> None:
        if self.min_increase < 1:
            raise ValueError("min_increase must be >= 1")


def detect_gpu_fault(
    counters: Mapping[str, Iterable[SampleLike]], cfg: GpuFaultConfig = GpuFaultConfig(), *, after: int | None = None
) -> Finding | None:
    """First rise of any GPU error counter. `counters` maps a name (e.g. "xid/rank0",
    "ecc/rank1") to cumulative samples by step."""
    events = []
    for name, xs in counters.items():
        ss = sorted_samples(xs)
        for i, onset, inc in counter_increases(ss):
            if after is None or onset > after:
                events.append((onset, ss[i].step, name, inc))
    events.sort()
    total = 0.0
    for j, (onset, at, name, inc) in enumerate(events):
        total += inc
        if total >= cfg.min_increase:
            evs = events[: j + 1]
            return Finding(
                IncidentKind.GPU_FAULT.value,
                evs[0][0],
                max(e[1] for e in evs),
                {
                    "counters": sorted({e[2] for e in evs}),
                    "increase": total,
                    "threshold": cfg.min_increase,
                    "window": [[e[1], e[3]] for e in evs][-32:],
                    "end_step": max(e[1] for e in evs),
                },
            )
    return None
