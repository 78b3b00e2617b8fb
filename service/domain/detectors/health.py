"""Detectors on liveness and hardware: hang (stale heartbeat), straggler (one slow rank),
worker lost (a dead rank in the group's status) and GPU fault (Xid / ECC error counters)."""
from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trainguard.service.domain.detectors.base import Finding, IncidentKind, counter_increases, evidence_window, sorted_samples
from trainguard.service.domain.series import Sample, SampleLike

__all__ = [
    "HangConfig",
    "StragglerConfig",
    "GpuFaultConfig",
    "detect_hang",
    "hang_threshold",
    "step_gaps",
    "detect_straggler",
    "detect_worker_lost",
    "detect_gpu_fault",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class HangConfig:
    """Hang: a rank's last-step heartbeat is older than a threshold derived from the gaps
    between the group's own recent steps (NVIDIA's resiliency extension likewise sets its
    heartbeat timeouts from observed intervals, times a safety factor):

        threshold = max(floor, gap_factor x longest gap, step_time_factor x median gap)
        floor     = min(timeout_s, max(min_timeout_s, floor_factor x median gap))

    With the second signal — every rank's process idle (neither running nor waiting to run)
    for idle_window_s — floor = min(timeout_s, idle_floor_s) and gap_factor = idle_gap_factor.

    A gap is the time between two consecutive steps' records (evaluation, checkpoint
    snapshots, control rounds and the machine's load included). Fast steps get a small floor
    (100 steps of 0.1 s: 10 s), slow ones the configured `timeout_s`; a loaded machine raises
    the threshold through the gaps it causes. The time to a worker group's first step is
    not a gap: that allowance is the watch's start-up grace (evaluate.py)."""

    timeout_s: float = 60.0
    """The floor for slow steps, and the most the floor can be (the deployment's
    HANG_TIMEOUT: Settings.hang_timeout takes its default from here). The threshold still
    exceeds it when the observed gaps ask for more."""
    min_timeout_s: float = 10.0
    """The least the floor can be, however fast the steps: scheduler stalls and collector
    pauses on a loaded machine last seconds whatever the step time (2.2 s between two 27 ms
    steps at load average 20, tests/bench/b_quiet.py)."""
    floor_factor: float = 100.0
    """The floor is this many median gaps (clamped to [min_timeout_s, timeout_s])."""
    gap_factor: float = 5.0
    """The threshold is at least this many times the longest gap in the history (as NVIDIA's
    `safety_factor`): an evaluation or checkpoint seen in the window never looks like a hang."""
    step_time_factor: float = 10.0
    """...and at least this many median gaps (slow stages: a hang is never declared within
    ten of its steps)."""
    window: int = 400
    """Most recent gaps the statistics use (the supervisor buffers 400 steps per rank)."""
    idle_floor_s: float = 1.0
    """The floor instead of min_timeout_s while every rank of the group is idle (the second
    signal: its worker process neither runs nor waits to run, workers/runtime/busy.py) for at
    least `idle_window_s`. A loaded machine's stalls leave threads runnable (waiting in the run
    queue counts as busy), so they never satisfy it; a hung step loop and its peers blocked in
    the next collective do. The gap and step-time terms still apply. 0: off (the heartbeat
    alone, as on the Prometheus path, which has no such reading)."""
    idle_window_s: float = 1.0
    """How long every rank must have been idle before `idle_floor_s` applies."""
    idle_gap_factor: float = 1.5
    """...and the longest gap counts this many times instead of `gap_factor`: the 5x margin is
    for what load and collector pauses can stretch a gap to, and they leave processes busy. A
    wait that looks idle and came before (a storage stall, a slow data fetch) still gets its
    margin. The goodput benchmark's slow steps beside a warm pool's refill (0.9 s at a 70 ms
    step, the process busy) put the 5x threshold at 4.4 s."""
    idle_fraction: float = 0.5
    """A rank is idle over an interval between two readings when its process was busy (ran or
    waited to run) for at most this fraction of it. One runnable thread alone counts 1.0 however
    loaded the machine (its run-queue wait counts); a hung worker's own background threads (Ray's
    core worker, gloo's loop, the scrapes) measured 0.05-0.2 on the 2-core CI machine under load."""

    def __post_init__(self) -> None:
        if min(self.timeout_s, self.min_timeout_s, self.floor_factor, self.gap_factor, self.step_time_factor) <= 0:
            raise ValueError("timeout_s, min_timeout_s and the factors must be > 0")
        if self.window < 1:
            raise ValueError("window must be >= 1")
        if self.idle_floor_s < 0 or self.idle_window_s < 0 or not 0 < self.idle_fraction < 1 or self.idle_gap_factor < 1:
            raise ValueError("idle_floor_s, idle_window_s must be >= 0, 0 < idle_fraction < 1, idle_gap_factor >= 1")


def step_gaps(records: Iterable[Mapping[str, Any]], breaks: Iterable[float] = ()) -> list[float]:
    """Seconds between consecutive steps, oldest first, from per-step records ("step", "time",
    "step_seconds", "seq" where the workers' history gives it): one per record, at least the
    record's own `step_seconds`. The time since the previous record counts only when the two
    are consecutive work of one process: the step advanced, `seq` advanced by as much (a
    rollback's replayed steps take fresh seqs) and no break lies between them (`breaks`:
    unix times of a worker group's start or an operator's resume). On sparse series (a
    Prometheus scrape every few steps) the gap is the scrape's, which errs long."""
    cuts = sorted(breaks)
    out: list[float] = []
    prev_step = prev_seq = None
    prev_time = -math.inf
    for rec in records:
        step, seq, t, own = rec.get("step"), rec.get("seq"), rec.get("time"), rec.get("step_seconds")
        gap = own if isinstance(own, (int, float)) and own > 0 else 0.0
        if isinstance(t, (int, float)) and isinstance(step, int):
            if (prev_step is not None and t >= prev_time and step > prev_step
                    and (seq is None or prev_seq is None or seq - prev_seq == step - prev_step)
                    and not _break_between(cuts, prev_time, t)):
                gap = max(gap, t - prev_time)
            prev_step, prev_seq, prev_time = step, seq, t
        else:
            prev_step = None
        if 0 < gap < math.inf:
            out.append(float(gap))
    return out


def _break_between(cuts: Sequence[float], a: float, b: float) -> bool:
    i = bisect.bisect_right(cuts, a)
    return i < len(cuts) and cuts[i] <= b


def hang_threshold(gaps: Sequence[float], cfg: HangConfig = HangConfig(), *, idle: bool = False) -> float:
    """Seconds without a step before a rank counts as hung, given the group's recent step gaps
    (`step_gaps`); `cfg.timeout_s` when there are none yet. `idle`: every rank of the group has
    been idle for `cfg.idle_window_s` (the floor is then `cfg.idle_floor_s`)."""
    recent = sorted(g for g in gaps[-cfg.window :] if math.isfinite(g) and g > 0)
    if not recent:
        return cfg.timeout_s
    median = statistics.median(recent)
    if idle and cfg.idle_floor_s > 0:
        floor, gap_factor = min(cfg.timeout_s, cfg.idle_floor_s), cfg.idle_gap_factor
    else:
        floor, gap_factor = min(cfg.timeout_s, max(cfg.min_timeout_s, cfg.floor_factor * median)), cfg.gap_factor
    return max(floor, gap_factor * recent[-1], cfg.step_time_factor * median)


def detect_hang(
    heartbeats: Mapping[int, Sample], now: float, cfg: HangConfig = HangConfig(), *,
    gaps: Sequence[float] | Callable[[], Sequence[float]] | None = None, step_seconds: float | None = None,
    idle: Mapping[int, float] | None = None,
) -> Finding | None:
    """Ranks whose heartbeat is stale at `now` (unix seconds, the caller's clock).
    `heartbeats[rank]` = Sample(step=last finished step, value=its unix time — the gauge
    trainguard_last_step_timestamp_seconds). `gaps`: the group's recent step gaps
    (`step_gaps`), or a function giving them, called only when a heartbeat is older than the
    least threshold there can be (the watch's usual cycle then reads no history); without
    them a typical `step_seconds` stands for every gap; with neither, the threshold is
    `cfg.timeout_s`. `idle`: rank -> seconds its process has been idle by the latest reading
    (ranks busy now, or without a reading, absent); when every rank of `heartbeats` has been
    idle for `cfg.idle_window_s`, the floor is `cfg.idle_floor_s`. Do not call for paused runs."""
    ages = {rank: now - hb.value for rank, hb in heartbeats.items()}
    all_idle = (idle is not None and cfg.idle_floor_s > 0 and bool(ages)
                and all(idle.get(r, -1.0) >= cfg.idle_window_s for r in ages))
    least = min(cfg.timeout_s, cfg.min_timeout_s, *([cfg.idle_floor_s] if all_idle else []))
    if not ages or max(ages.values()) <= least:
        return None
    if callable(gaps):
        gaps = gaps()
    elif gaps is None:
        gaps = [step_seconds] if step_seconds is not None else []
    timeout = hang_threshold(gaps, cfg, idle=all_idle)
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
            "idle_seconds": {str(r): idle[r] for r in hung} if all_idle and idle is not None else None,
            "score": max(ages[r] for r in hung),
            "gaps": len(gaps),
            "window": [[heartbeats[r].step, heartbeats[r].value] for r in hung],
            "end_step": None,
        },
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class StragglerConfig:
    """Straggler: one rank's own compute time well above the other ranks' at the same steps,
    over most of its recent steps. Compared step by step, a slowdown every rank shares (a
    loaded machine, a slow batch, a collector pause) cancels out; the median over a window
    ignores a rank that is slow only now and then (a core it shares with another process for
    a few steps): more than half of the window's steps must be slow."""

    window: int = 48
    """Most recent steps of a rank that are compared."""
    min_samples: int = 32
    """Steps (with the other ranks' at the same step) a rank needs before it is compared."""
    factor: float = 1.6
    """Straggler when the median, over the window, of the rank's time / the other ranks'
    median time at the same step is above this..."""
    min_excess_s: float = 0.025
    """...and the median difference is at least this many seconds: about one scheduler period
    of a loaded machine, below which a tiny step's time is the CPU scheduler's noise (tiny
    models at load average 20 reached 1.5x with a median excess of 17 ms)."""

    def __post_init__(self) -> None:
        if self.factor <= 1 or self.window < 1 or self.min_samples < 1 or self.min_excess_s < 0:
            raise ValueError("factor must be > 1; window, min_samples >= 1; min_excess_s >= 0")


def detect_straggler(step_seconds: Mapping[int, Iterable[SampleLike]], cfg: StragglerConfig = StragglerConfig()) -> Finding | None:
    """The slowest straggling rank, from per-rank step-time samples (the workers' compute time
    before the all-reduce; needs >= 2 ranks). Each of a rank's last `window` samples is paired
    with the median of the other ranks' samples at that step (on sparse series: their last one
    at or before it, within the window). Onset = the first slow step (over `factor` x and
    `min_excess_s` above the others) in that window."""
    series = {r: [s for s in sorted_samples(xs) if math.isfinite(s.value)] for r, xs in step_seconds.items()}
    series = {r: ss for r, ss in series.items() if ss}
    if len(series) < 2:
        return None
    steps = {r: [s.step for s in ss] for r, ss in series.items()}
    # many ranks: the peers' medians from one sorted list per (step, window start), not one sort
    # per (rank, step); same values (plain non-zero floats, so any equal value is the same one)
    grouped = len(series) >= 4 and all(type(s.value) is float and s.value != 0.0
                                       for ss in series.values() for s in ss)
    sorted_at: dict[tuple[int, int], list[float]] = {}  # (step, window start) -> every rank's value, sorted
    worst: tuple[float, int, list[tuple[Sample, float]]] | None = None
    for r, ss in series.items():
        recent = ss[-cfg.window :]
        pairs = (_references_grouped(series, steps, recent, sorted_at) if grouped
                 else _references(series, steps, r, recent))
        if len(pairs) < cfg.min_samples:
            continue
        score = statistics.median(s.value / ref if ref > 0 else math.inf for s, ref in pairs)
        excess = statistics.median(s.value - ref for s, ref in pairs)
        if score > cfg.factor and excess >= cfg.min_excess_s and (worst is None or score > worst[0]):
            worst = (score, r, pairs)
    if worst is None:
        return None
    score, rank, pairs = worst
    window = [s for s, _ in pairs]
    return Finding(
        IncidentKind.STRAGGLER.value,
        _straggler_onset(pairs, cfg),
        window[-1].step,
        {
            "rank": rank,
            "rank_median_s": statistics.median(s.value for s in window),
            "others_median_s": statistics.median(ref for _, ref in pairs),
            "threshold": cfg.factor,
            "score": score,
            "window": evidence_window(window, 0, len(window) - 1),
            "end_step": None,
        },
    )


def _references(series: Mapping[int, Sequence[Sample]], steps: Mapping[int, Sequence[int]], r: int,
                recent: Sequence[Sample]) -> list[tuple[Sample, float]]:
    """(sample, median of the other ranks' last samples at or before its step, within the window)."""
    pairs = []
    for s in recent:
        peers = []
        for q, qs in series.items():
            i = bisect.bisect_right(steps[q], s.step) if q != r else 0
            if i and qs[i - 1].step >= recent[0].step:
                peers.append(qs[i - 1].value)
        if peers:
            pairs.append((s, statistics.median(peers)))
    return pairs


def _references_grouped(series: Mapping[int, Sequence[Sample]], steps: Mapping[int, Sequence[int]],
                        recent: Sequence[Sample], sorted_at: dict[tuple[int, int], list[float]]
                        ) -> list[tuple[Sample, float]]:
    """`_references` computed once per (step, window start) in `sorted_at`: the sorted values of
    every rank there (the rank's own sample included, the last at or before the step: its own),
    less one occurrence of its value, are its peers' values sorted; their median is taken as
    statistics.median takes it."""
    start = recent[0].step
    pairs = []
    for s in recent:
        full = sorted_at.get((s.step, start))
        if full is None:
            vals = []
            for q, qs in series.items():
                i = bisect.bisect_right(steps[q], s.step)
                if i and qs[i - 1].step >= start:
                    vals.append(qs[i - 1].value)
            full = sorted_at[(s.step, start)] = sorted(vals)
        n = len(full) - 1  # the peers: all but r's own sample
        if n <= 0:
            continue
        p = bisect.bisect_left(full, s.value)
        half = n // 2
        if n % 2:
            ref = full[half] if half < p else full[half + 1]
        else:
            lo = full[half - 1] if half - 1 < p else full[half]
            hi = full[half] if half < p else full[half + 1]
            ref = (lo + hi) / 2
        pairs.append((s, ref))
    return pairs


def _straggler_onset(pairs: Sequence[tuple[Sample, float]], cfg: StragglerConfig) -> int:
    """The first slow step of the longest tail of the window in which at least two thirds of
    the steps are slow (the noise before a straggler began has some slow steps too); the
    window's first slow step when no tail is that slow."""
    slow = [s.value > cfg.factor * ref and s.value - ref >= cfg.min_excess_s for s, ref in pairs]
    onset, count = None, 0
    for i in range(len(pairs) - 1, -1, -1):
        count += slow[i]
        if slow[i] and 3 * count >= 2 * (len(pairs) - i):
            onset = pairs[i][0].step
    if onset is None:
        onset = next((s.step for (s, _), bad in zip(pairs, slow) if bad), pairs[0][0].step)
    return onset


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
