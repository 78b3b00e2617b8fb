"""Straggler and hang on synthetic per-rank histories of a loaded machine (issue 14 item 5,
issue 13's hang floor): quiet when every rank is slowed together or one is slow now and
then; a rank consistently 2x slower is a straggler, and a real hang is found in bounded time.

The noise model is the one tests/bench/b_quiet.py measured on a loaded 2-core machine with
a CPU hog: per step and rank, log-normal jitter plus, on ~12% of steps, a rank preempted for
2-6x its time, under a machine-wide slowdown that drifts over minutes and comes in bursts.
"""
from __future__ import annotations

import math
from dataclasses import replace
import random

import pytest

from trainguard.service.adapters.metrics import Target
from trainguard.service.domain import detectors as d
from trainguard.service.domain.evaluate import WatchConfig, evaluate_stage
from trainguard.service.domain.series import Sample
from trainguard.service.supervisor.stage import ActiveStage


class Load:
    """The machine-wide slowdown: drifting between 0.7x and 2.5x over minutes, and every rank
    3-5x slower together in bursts of 3-20 steps (the machine, not a rank)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.drift, self.burst, self.burst_factor = rng, 1.0, 0, 1.0

    def next(self) -> float:
        rng = self.rng
        self.drift = min(max(self.drift * math.exp(rng.gauss(0, 0.05)), 0.7), 2.5)
        if self.burst == 0 and rng.random() < 0.02:
            self.burst, self.burst_factor = rng.randint(3, 20), rng.uniform(3, 5)
        factor = self.burst_factor if self.burst else 1.0
        self.burst = max(self.burst - 1, 0)
        return self.drift * factor


def loaded_compute(n: int, ranks: int, seed: int, *, slow: dict[int, tuple[int, float]] | None = None,
                   base: float = 0.05) -> dict[int, list[Sample]]:
    """Per-rank compute seconds for steps 1..n. `slow[rank] = (from_step, factor)`: a straggler."""
    rng = random.Random(seed)
    load = Load(rng)
    out: dict[int, list[Sample]] = {r: [] for r in range(ranks)}
    for step in range(1, n + 1):
        shared = load.next()
        for r in range(ranks):
            t = base * shared * math.exp(rng.gauss(0, 0.2))
            if rng.random() < 0.12:
                t *= rng.uniform(2, 6)  # this rank lost its core for a while
            if slow and r in slow and step >= slow[r][0]:
                t *= slow[r][1]
            out[r].append(Sample(step, t, float(step)))
    return out


def replay(series: dict[int, list[Sample]], cfg: d.StragglerConfig = d.StragglerConfig()) -> list[d.Finding]:
    """The detector at every step, over the last 400 steps (what the supervisor buffers)."""
    found = []
    n = len(series[0])
    for i in range(1, n + 1):
        f = d.detect_straggler({r: xs[max(0, i - 400):i] for r, xs in series.items()}, cfg)
        if f is not None:
            found.append(f)
    return found


# --------------------------------------------------------------------------- straggler


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("seed", range(3))
def test_no_straggler_when_the_whole_machine_is_loaded(ranks, seed):
    series = loaded_compute(1500, ranks, seed)
    ratios = [a.value / b.value for a, b in zip(series[1], series[0])]
    assert sum(x > 1.5 for x in ratios) > 0.15 * len(ratios)  # the noise is real: many single steps look slow
    assert replay(series) == []


def test_a_rank_slow_for_a_few_steps_now_and_then_is_not_a_straggler():
    series = loaded_compute(1000, 2, seed=11)
    for start in range(100, 1000, 100):  # 10 steps at 3x, every 100 steps
        for j in range(start, start + 10):
            s = series[1][j]
            series[1][j] = Sample(s.step, 3 * s.value, s.time)
    assert replay(series) == []


@pytest.mark.parametrize("seed", range(3))
def test_a_rank_consistently_twice_as_slow_is_a_straggler_within_48_steps(seed):
    onset = 300
    series = loaded_compute(600, 2, seed, slow={1: (onset, 2.0)})
    found = replay(series)
    assert found, "a 2x straggler was never reported"
    first = found[0]
    assert first.evidence["rank"] == 1 and first.kind == "straggler"
    assert onset <= first.detected_at_step <= onset + 48
    assert onset - 10 <= first.onset_step <= first.detected_at_step
    assert first.evidence["score"] > d.StragglerConfig().factor


def test_a_straggler_among_four_ranks_is_named():
    series = loaded_compute(400, 4, seed=5, slow={2: (100, 3.0)})
    f = d.detect_straggler(series)
    assert f is not None and f.evidence["rank"] == 2


def test_a_straggler_is_found_on_sparse_series_whose_steps_differ_between_ranks():
    """Prometheus scrapes each rank at its own moment: rank 1's samples are a few steps off rank 0's."""
    r0 = [Sample(s, 0.05) for s in range(0, 400, 7)]
    r1 = [Sample(s, 0.12) for s in range(3, 400, 7)]
    f = d.detect_straggler({0: r0, 1: r1}, d.StragglerConfig(min_samples=16))
    assert f is not None and f.evidence["rank"] == 1


def test_no_straggler_from_sub_millisecond_differences_on_tiny_steps():
    series = {0: [Sample(i, 0.001) for i in range(100)], 1: [Sample(i, 0.003) for i in range(100)]}
    assert d.detect_straggler(series) is None


# --------------------------------------------------------------------------- hang


def loaded_records(n: int, seed: int, *, step: float = 0.1, eval_every: int = 200, eval_s: float = 0.7,
                   ckpt_every: int = 50, ckpt_s: float = 0.3, t0: float = 1000.0) -> list[dict]:
    """Rank 0's per-step records: `time` at each step's end, with evaluation and checkpoint
    pauses between steps (~7 and ~3 steps' worth, as measured), all stretched by `Load`."""
    rng = random.Random(seed)
    load = Load(rng)
    t = t0
    recs = []
    for i in range(1, n + 1):
        shared = load.next()
        own = step * shared * math.exp(rng.gauss(0, 0.2))
        pause = (eval_s if i % eval_every == 1 and i > 1 else 0.0) + (ckpt_s if i % ckpt_every == 1 and i > 1 else 0.0)
        t += own + pause * shared
        recs.append({"step": i, "seq": i, "time": t, "step_seconds": own})
    return recs


def watch(records: list[dict], cfg: d.HangConfig, *, until: float | None = None, every: float = 0.5) -> list[tuple[float, d.Finding]]:
    """The hang check at every watch cycle from the first record to `until` (default: the last
    record), each cycle seeing the records finished by then."""
    out = []
    now, i = records[0]["time"], 0
    end = records[-1]["time"] if until is None else until
    while now <= end:
        while i + 1 < len(records) and records[i + 1]["time"] <= now:
            i += 1
        seen = records[max(0, i - 399): i + 1]
        beat = seen[-1]
        f = d.detect_hang({0: Sample(beat["step"], beat["time"])}, now, cfg, gaps=lambda s=seen: d.step_gaps(s))
        if f is not None:
            out.append((now, f))
        now += every
    return out


@pytest.mark.parametrize("seed", range(3))
def test_no_hang_on_a_loaded_machine_with_evaluations_and_checkpoints(seed):
    recs = loaded_records(4000, seed)
    gaps = [b["time"] - a["time"] for a, b in zip(recs, recs[1:])]
    assert max(gaps) > 3.0  # evaluations under a burst of load: longer than the least floor
    assert watch(recs, d.HangConfig()) == []


def test_a_real_hang_is_found_within_the_derived_threshold():
    recs = loaded_records(600, seed=3)
    cfg = d.HangConfig()  # the deployment default: timeout_s 60
    last = recs[-1]["time"]
    found = watch(recs, cfg, until=last + 120)
    assert found, "the hang was never found"
    at, f = found[0]
    assert f.kind == "hang" and f.onset_step == recs[-1]["step"]
    thr = f.evidence["threshold"]
    assert thr <= 15.0  # fast steps: a floor derived from them, not the fixed 60 s
    assert last + thr < at <= last + thr + 0.5  # within one watch cycle of the threshold


def test_the_floor_follows_the_step_time_between_its_bounds():
    cfg = d.HangConfig(timeout_s=60.0)
    assert d.hang_threshold([0.01] * 100, cfg) == cfg.min_timeout_s  # tiny steps: the least floor
    assert d.hang_threshold([0.2] * 100, cfg) == pytest.approx(20.0)  # 100 steps
    assert d.hang_threshold([2.0] * 100, cfg) == 60.0  # slow steps: the configured timeout
    assert d.hang_threshold([30.0] * 100, cfg) == 300.0  # slower still: ten steps
    assert d.hang_threshold([0.1] * 99 + [4.0], cfg) == pytest.approx(20.0)  # 5x the longest gap seen
    assert d.hang_threshold([0.01] * 100, d.HangConfig(min_timeout_s=3.0)) == 3.0
    assert d.hang_threshold([], cfg) == 60.0  # nothing observed yet
    assert d.hang_threshold([0.1] * 100, d.HangConfig(timeout_s=2.0)) == 2.0  # an operator's lower timeout caps the floor


def test_step_gaps_skip_restarts_resumes_and_rollbacks():
    recs = [{"step": s, "seq": s, "time": 100.0 + s, "step_seconds": 0.5} for s in range(1, 11)]
    assert d.step_gaps(recs) == [0.5] + [1.0] * 9
    # the group restarted at t=200 from step 10: its first step's gap is the start-up, not a step
    restarted = recs + [{"step": 11, "seq": 11, "time": 230.0, "step_seconds": 2.0},
                        {"step": 12, "seq": 12, "time": 231.0, "step_seconds": 0.5}]
    assert d.step_gaps(restarted, breaks=[200.0])[-2:] == [2.0, 1.0]
    # rolled back to step 5 in-process: replayed steps take fresh seqs, the jump is not a gap
    rolled = recs[:5] + [{"step": 6, "seq": 11, "time": 160.0, "step_seconds": 0.5}]
    assert d.step_gaps(rolled)[-1] == 0.5
    # sparse series (Prometheus scrapes): the scrape's gap, which errs long
    sparse = [{"step": 1, "time": 0.0}, {"step": 9, "time": 1.0}, {"step": 17, "time": 2.0}]
    assert d.step_gaps(sparse) == [1.0, 1.0]


# --------------------------------------------------------------------------- through the watch


def _stage(records: list[dict], ranks: int = 1) -> ActiveStage:
    """A running stage whose rank 0 reported `records`."""
    active = ActiveStage(run_id="r", name="pretrain", kind="pretrain", index=0, steps=10_000)
    active.targets = [Target(run="r", stage="pretrain", rank=r, host="127.0.0.1", port=1 + r) for r in range(ranks)]
    for rec in records:
        active.series(0).append(rec)
    if records:
        active.heartbeat = {0: records[-1]["time"]}
    return active


def test_a_new_group_gets_the_start_up_grace_before_its_first_step_whatever_the_step_time():
    recs = [{"step": s, "seq": s, "time": 1000.0 + 0.1 * s, "step_seconds": 0.1} for s in range(1, 201)]
    active = _stage(recs)
    active.new_group(group=None, targets=active.targets, resumed_at_step=200)  # restarted from step 200
    start = active.started_at
    cfg = WatchConfig(startup_grace=60.0)
    assert [f.kind for f in evaluate_stage(active, cfg, now=start + 30.0)] == []  # 3x the derived 10 s
    assert [f.kind for f in evaluate_stage(active, cfg, now=start + 61.0)] == ["hang"]
    # its first step arrives: from then on the step-to-step threshold, from the kept history
    active.series(0).append({"step": 201, "seq": 201, "time": start + 40.0, "step_seconds": 0.2})
    active.heartbeat = {0: start + 40.0}
    assert [f.kind for f in evaluate_stage(active, cfg, now=start + 49.0)] == []
    (f,) = evaluate_stage(active, cfg, now=start + 51.0)
    assert f.kind == "hang" and f.evidence["threshold"] == pytest.approx(10.0)  # the restart's 40 s is no gap


def test_the_watch_compares_the_ranks_compute_time_step_by_step():
    series = loaded_compute(400, 2, seed=2, slow={1: (353, 3.0)})  # rank 1 alone 3x slower for the last 48 steps
    active = _stage([], ranks=2)
    active.heartbeat = {0: 1400.0, 1: 1400.0}

    def reported(upto: int) -> None:
        for r, xs in series.items():
            for s in xs[len(active.series(r)):upto]:
                # the wall-clock step time is the same on every rank: each waits for the slowest
                active.series(r).append({"step": s.step, "time": 1000.0 + s.step, "compute_seconds": s.value,
                                         "step_seconds": max(x[s.step - 1].value for x in series.values())})

    reported(352)  # the machine's load alone: no straggler
    assert "straggler" not in [f.kind for f in evaluate_stage(active, WatchConfig(), now=1400.5)]
    reported(400)
    (f,) = [f for f in evaluate_stage(active, WatchConfig(), now=1400.5) if f.kind == "straggler"]
    assert f.evidence["rank"] == 1 and f.onset_step >= 348


def test_a_hang_with_every_rank_idle_is_found_at_the_idle_floor():
    """The second signal: every rank's process idle (neither running nor waiting to run) for
    idle_window_s lowers the floor from min_timeout_s to idle_floor_s; the gap and step-time
    terms still apply, and one busy rank, a short idle spell or the floor off keep the old rule."""
    cfg = d.HangConfig(timeout_s=5.0)
    gaps = [0.06] * 200 + [0.15]  # 60 ms steps, a checkpoint's longer gap
    beats = {0: Sample(180, 100.0), 1: Sample(180, 100.0)}
    assert d.hang_threshold(gaps, cfg, idle=True) == pytest.approx(1.0)  # the idle floor (5 x 0.15 s = 0.75 s)
    assert d.hang_threshold(gaps, cfg) == pytest.approx(5.0)  # min(timeout_s, 10 s)
    f = d.detect_hang(beats, 101.2, cfg, gaps=gaps, idle={0: 1.1, 1: 1.0})
    assert f is not None and f.evidence["ranks"] == [0, 1] and f.evidence["threshold"] == pytest.approx(1.0)
    assert f.evidence["idle_seconds"] == {"0": 1.1, "1": 1.0}
    assert d.detect_hang(beats, 100.9, cfg, gaps=gaps, idle={0: 1.1, 1: 1.0}) is None  # under the floor
    assert d.detect_hang(beats, 101.2, cfg, gaps=gaps, idle={0: 1.1}) is None  # rank 1 busy (or unread)
    assert d.detect_hang(beats, 101.2, cfg, gaps=gaps, idle={0: 1.1, 1: 0.5}) is None  # idle too briefly
    assert d.detect_hang(beats, 101.2, replace(cfg, idle_floor_s=0.0), gaps=gaps, idle={0: 2.0, 1: 2.0}) is None
    assert d.detect_hang(beats, 101.2, cfg, gaps=gaps) is None  # no reading: the heartbeat alone
    assert d.detect_hang(beats, 105.1, cfg, gaps=gaps) is not None
    # slow steps keep their ten-step allowance, idle or not (a GPU waiting with blocking sync)
    assert d.detect_hang(beats, 110.0, cfg, gaps=[2.0] * 50, idle={0: 9.0, 1: 9.0}) is None
    # a slow step seen before (0.9 s): 1.5x it while idle, 5x it on the heartbeat alone
    slow = gaps + [0.9]
    assert d.hang_threshold(slow, cfg, idle=True) == pytest.approx(1.35)
    assert d.hang_threshold(slow, cfg) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        d.HangConfig(idle_fraction=0.0)


def test_the_watch_reads_idleness_from_successive_busy_readings():
    """ActiveStage.observe_busy: a rank is idle since the first of two readings between which
    its process stayed under idle_fraction busy with the heartbeat still; a step, a busy
    interval or a new group clear it. Through evaluate_stage the idle group is hung at the idle
    floor, and a group past its stage's last step (waiting for its driver) is not."""
    recs = [{"step": s, "seq": s, "time": 1000.0 + 0.06 * s, "step_seconds": 0.06} for s in range(1, 201)]
    active = _stage(recs, ranks=2)
    last = recs[-1]["time"]
    active.heartbeat = {0: last, 1: last}
    frac = d.HangConfig().idle_fraction
    for rank in (0, 1):
        active.observe_busy(rank, last, last + 0.1, 10.0, frac)
        active.observe_busy(rank, last, last + 0.6, 10.4, frac)  # 0.4 s busy of 0.5 s: working
    assert active.idle == {}
    for rank in (0, 1):
        active.observe_busy(rank, last, last + 1.1, 10.41, frac)  # 2 %: idle since the reading at +0.6
    assert active.idle == pytest.approx({0: 0.5, 1: 0.5})
    cfg = WatchConfig(hang=d.HangConfig(timeout_s=5.0))
    assert evaluate_stage(active, cfg, now=last + 1.2) == []  # idle only 0.5 s: the 5 s floor holds
    for rank in (0, 1):
        active.observe_busy(rank, last, last + 1.7, 10.42, frac)
    assert active.idle == pytest.approx({0: 1.1, 1: 1.1})
    (f,) = evaluate_stage(active, cfg, now=last + 1.7)
    assert f.kind == "hang" and f.evidence["threshold"] == pytest.approx(1.0) and f.evidence["ranks"] == [0, 1]
    active.steps = 200  # its last step: the group is done, not hung
    assert evaluate_stage(active, cfg, now=last + 1.7) == []
    active.steps = 10_000
    active.observe_busy(1, last, last + 2.2, 11.0, frac)  # rank 1 busy again: no longer all idle
    assert 1 not in active.idle and evaluate_stage(active, cfg, now=last + 2.2) == []
    active.observe_busy(0, last + 2.3, last + 2.4, 10.43, frac)  # a step: rank 0's clock starts again
    assert 0 not in active.idle
    active.observe_busy(0, last + 2.3, last + 2.9, 10.43, frac)
    assert active.idle == pytest.approx({0: 0.5})
    active.new_group(group=None, targets=active.targets, resumed_at_step=200)
    assert active.idle == {} and active.busy == {}
