"""quiet_healthy: straggler and hang notices on a healthy run with a CPU hog beside it.

Issue 14 item 5 ("quiet on healthy runs") and issue 13's hang floor share one criterion:
zero straggler or hang notices over at least 30 minutes of healthy runs on a loaded
machine. This is that measurement.

One healthy 2-rank pretrain (no faults; `small` model, `tiny` in smoke; a checkpoint every
50 steps, an evaluation every 200) under the real supervisor (embedded scrape path, 0.5 s
watch; hang timeout 5 s as in the other Ray benchmarks, which caps the derived hang floor
at 5 s: stricter than the deployment's 60 s), while `TRAINGUARD_BENCH_QUIET_HOGS`
busy-looping processes (default 1) run beside it for the whole run, start-up included (in
smoke, from the first step on: a group's start-up on a loaded machine takes minutes). The
run trains for `TRAINGUARD_BENCH_QUIET_S` seconds from its first step (default 1800 = the
criterion's 30 minutes; 8 in smoke), then is stopped.

Row `quiet_healthy` (seconds, higher is better):
- ours: seconds of healthy training before the supervisor recorded its first straggler or hang
  incident (the whole duration when it recorded none);
- baseline: the same for the rules before issue 14/13 (straggler: a rank's median compute
  time over its last 32 steps > 1.5x the others'; hang: max(5 s, 10x the median step time)),
  replayed over the same per-rank logs at the watch's 0.5 s cycle.
A ratio of 1 with both at the duration means neither fired.

Secondary figures: seconds from submission to the first step (the start-up allowance's
test), incidents recorded (straggler, hang; a hang before the first step counts at 0 s),
notices (incidents whose action was notify), the old rules' replayed episodes, the run's steps, the longest gap between two
steps, the hang threshold the watch derived (median over the cycles) and the largest
gap / threshold seen (hang margin: < 1 means no gap came near a false hang), the machine's
1-minute load average at the end.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from tests.bench.core import Context, Measurement, benchmark, log, read_jsonl, step_records, wait_until
from tests.bench.shared import controller, ts
from tests.bench.workload import metrics_log, pipeline, size_for
from tests.support import stop_process

FULL_S, SMOKE_S = 1800.0, 8.0
HANG_TIMEOUT_S = 5.0  # the Ray benchmarks' setting (tests/bench/shared.py)
WATCH_S = 0.5
NOISY = ("straggler", "hang")


def _duration(smoke: bool) -> float:
    return float(os.environ.get("TRAINGUARD_BENCH_QUIET_S") or (SMOKE_S if smoke else FULL_S))


@contextlib.contextmanager
def cpu_hog(n: int) -> Iterator[list[subprocess.Popen]]:
    """`n` processes that spin on a core each for as long as the body runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            stop_process(p, grace=2)


def _state(ctl: Any, run_id: str) -> str:
    from trainguard.service.db import crud

    with ctl.session() as s:
        return str(crud.get_run(s, run_id=run_id).state)


# -- the rules before issue 14/13, replayed as the baseline ----------------------------------------
def old_straggler(compute: dict[int, list[float]]) -> bool:
    """A rank's median compute time over its last 32 steps > max(1.5x, +10 ms) the others' (>= 8 each)."""
    med = {r: statistics.median(xs[-32:]) for r, xs in compute.items() if len(xs) >= 8}
    if len(med) < 2:
        return False
    for r, m in med.items():
        others = statistics.median(v for q, v in med.items() if q != r)
        if m > max(1.5 * others, others + 0.01):
            return True
    return False


def old_hang_threshold(step_seconds: Sequence[float]) -> float:
    recent = sorted(step_seconds[-20:])
    return max(HANG_TIMEOUT_S, 10 * recent[len(recent) // 2]) if recent else HANG_TIMEOUT_S


def replay(logs: dict[int, list[dict]], first: float) -> dict[str, float]:
    """Both rule sets over the logs at each watch cycle: the old rules' episodes (a run of cycles
    that fire) and when they first fired; the new hang threshold and the largest gap / threshold."""
    from trainguard.service.domain import detectors

    recs = {r: step_records(xs) for r, xs in logs.items()}
    end = min(xs[-1]["time"] for xs in recs.values())
    idx = {r: 0 for r in recs}
    old_s_eps = old_h_eps = 0
    old_first = float("inf")
    in_s = in_h = False
    thresholds: list[float] = []
    margin = 0.0
    t = first
    while t <= end:
        for r, xs in recs.items():
            while idx[r] < len(xs) and xs[idx[r]]["time"] <= t:
                idx[r] += 1
        seen = {r: recs[r][max(0, idx[r] - 400): idx[r]] for r in recs}
        compute = {r: [float(x["compute_seconds"]) for x in xs] for r, xs in seen.items()}
        s = old_straggler(compute)
        old_s_eps += s and not in_s
        in_s = s
        r0 = seen[0]
        # the heartbeat: the last record's time (a step counts once its record is out)
        age = t - r0[-1]["time"] if r0 else 0.0
        h = bool(r0) and age > old_hang_threshold([float(x["step_seconds"]) for x in r0])
        old_h_eps += h and not in_h
        in_h = h
        if (s or h) and old_first == float("inf"):
            old_first = t
        if r0:
            thr = detectors.hang_threshold(detectors.step_gaps(r0), detectors.HangConfig(timeout_s=HANG_TIMEOUT_S))
            thresholds.append(thr)
            margin = max(margin, age / thr)
        t += WATCH_S
    return {"old_straggler_episodes": old_s_eps, "old_hang_episodes": old_h_eps,
            "old_quiet_s": min(old_first, end) - first,
            "hang_threshold_s": statistics.median(thresholds) if thresholds else float("nan"),
            "hang_margin_max": margin}


@benchmark("quiet_healthy", reps=1, smoke_reps=1, uses_ray=True)
def quiet_healthy(ctx: Context) -> dict[str, Measurement]:
    """Healthy 2-rank pretrain beside a CPU hog: seconds before a straggler/hang notice (ours vs the old rules)."""
    from trainguard.service.db import crud

    duration = _duration(ctx.smoke)
    hogs = int(os.environ.get("TRAINGUARD_BENCH_QUIET_HOGS") or 1)
    spec = pipeline(name="quiet", size=size_for(ctx.smoke), steps=10_000_000, world_size=2, every=50,
                    eval_every=200)
    state = ctx.sub("quiet")
    log(f"  quiet: healthy 2-rank run for {duration:.0f}s beside {hogs} CPU hog(s)")
    with contextlib.ExitStack() as stack:
        if not ctx.smoke:  # start-up under load too (smoke: only the training, to keep it short)
            stack.enter_context(cpu_hog(hogs))
        ctl = stack.enter_context(controller(state, watch_interval=WATCH_S, hang_timeout=HANG_TIMEOUT_S))
        submitted = time.time()
        run_id = ctl.submit(spec, actor="bench")
        rank0 = metrics_log(state, run_id, 0)
        wait_until(lambda: read_jsonl(rank0) or _state(ctl, run_id) not in ("pending", "running", "recovering"),
                   900, interval=0.5, what="the first step")
        if ctx.smoke:
            stack.enter_context(cpu_hog(hogs))
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline and _state(ctl, run_id) in ("running", "recovering"):
            time.sleep(1.0)
        end_state = _state(ctl, run_id)
        if end_state in ("running", "recovering", "pending"):
            ctl.stop(run_id, actor="bench")
            wait_until(lambda: _state(ctl, run_id) == "stopped", 120, interval=0.5, what="the run to stop")
        with ctl.session() as s:
            incs = list(crud.list_incidents(s, run_id=run_id))
        load1 = os.getloadavg()[0]
    if end_state not in ("running", "recovering"):
        raise RuntimeError(f"the healthy run ended {end_state!r} on its own "
                           f"(incidents: {[(i.kind, i.action) for i in incs]})")
    logs = {r: read_jsonl(metrics_log(state, run_id, r)) for r in (0, 1)}
    steps0 = step_records(logs[0])
    first = steps0[0]["time"]
    noisy = sorted((i for i in incs if i.kind in NOISY), key=lambda i: i.id)
    ours = (ts(noisy[0].detected_at) - first) if noisy else steps0[-1]["time"] - first
    rep = replay(logs, first)
    gaps = [b["time"] - a["time"] for a, b in zip(steps0, steps0[1:]) if int(b["step"]) == int(a["step"]) + 1]
    extra = {"seconds": steps0[-1]["time"] - first, "steps": float(len(steps0)), "hogs": float(hogs),
             "first_step_s": first - submitted,
             "straggler_incidents": float(sum(i.kind == "straggler" for i in incs)),
             "hang_incidents": float(sum(i.kind == "hang" for i in incs)),
             "notices": float(sum(i.action == "notify" for i in incs)),
             "incidents_all": float(len(incs)), "step_gap_max_s": max(gaps, default=0.0),
             "step_gap_median_s": statistics.median(gaps) if gaps else 0.0, "load_avg_1m": load1, **rep}
    log(f"  quiet: {len(steps0)} steps in {extra['seconds']:.0f}s; incidents {[(i.kind, i.action) for i in incs]}; "
        f"old rules: {rep['old_straggler_episodes']:.0f} straggler, {rep['old_hang_episodes']:.0f} hang episodes; "
        f"hang threshold ~{rep['hang_threshold_s']:.1f}s, max gap/threshold {rep['hang_margin_max']:.2f}")
    return {"quiet_healthy": Measurement(max(ours, 1e-3), max(rep["old_quiet_s"], 1e-3), "s",
                                         "the old rules (median 1.5x straggler; max(5 s, 10x step) hang), "
                                         "replayed on the same logs",
                                         higher_is_better=True, extra=extra)}
