"""goodput: useful step time / wall time for a 2-rank run under a dense fault schedule.

Useful step time: the sum of `step_seconds` (rank 0) over the steps that count in the
end — steps later undone by a rollback or by a restart from an older checkpoint are
dropped (tests/bench/core.py `timeline`). Wall time: from the start of the first step
to the end of the last (process start-up before the first step is the same fixed cost
for both and is left out). Same formula, same logs, for both sides.

Ours (full size): 300 steps of the `small` model with a worker crash (batch 60, rank 1),
a loss spike (batch 120, 4 corrupted batches), a hang (batch 180, rank 0; hang timeout
5 s) and a second crash (batch 240, rank 0) — four faults in a run of about a minute or
two on this machine: more than one fault per minute. The supervisor (embedded path)
recovers each: restarts for the crash and the hang, rollback + skip for the spike.

Baseline: Ray Train `TorchTrainer` with the same two crashes, `FailureConfig(max_failures=2)`.
Ray Train cannot see a loss spike or a hang, so neither is injected there: the spike
would simply be trained through (its steps would count as useful, which flatters the
baseline) and a hung rank would block the gradient all-reduce until gloo's 30-minute
timeout (which would sink its goodput; left out rather than counted).

Smoke size (structure only): the shared smoke run (crash, then a spike), against the goodput
of the same run before its first fault; no Ray Train run.
"""
from __future__ import annotations

from tests.bench.core import Context, Measurement, benchmark, log, timeline
from tests.bench.shared import raytrain_run, smoke_run, supervised_run
from tests.bench.workload import pipeline, size_for


def goodput(records: list[dict]) -> tuple[float, float, float]:
    """(goodput, useful seconds, wall seconds) from a rank's per-step log."""
    recs = [r for r in records if "step_seconds" in r and not r.get("eval")]
    if not recs:
        raise RuntimeError("no steps in the log")
    useful = sum(float(r["step_seconds"]) for r in timeline(recs))
    wall = recs[-1]["time"] - (recs[0]["time"] - float(recs[0]["step_seconds"]))
    return useful / wall, useful, wall


@benchmark("goodput", reps=1, smoke_reps=1, uses_ray=True)
def goodput_bench(ctx: Context) -> dict[str, Measurement]:
    """Goodput under crashes, a hang and a loss spike (ours) vs Ray Train under the same crashes."""
    if ctx.smoke:  # structure only: Ray Train runs at full size
        ours = smoke_run(ctx)
        o, ou, ow = goodput(ours.log())
        crash = ours.fired("worker_crash")
        if crash is None:
            raise RuntimeError("smoke: the crash never fired")
        # baseline: the same run before its first fault (what it does with no fault at all)
        f, _, _ = goodput([r for r in ours.log() if float(r["time"]) < crash])
        log(f"  ours: {o:.3f} ({ou:.1f}s useful / {ow:.1f}s wall); before the first fault {f:.3f}")
        return {"goodput": Measurement(o, f, "ratio", "smoke: the same run before its first fault (no Ray Train run)",
                                       higher_is_better=True, extra={"ours_wall_s": ow})}
    else:
        from trainguard.workers.group import warm_pool

        pool = warm_pool()  # sized as recovery_worker_crash's: a start's and a restart's worth
        pool.size = max(pool.size, 4)
        steps = 300
        crashes = [(60, 1), (240, 0)]
        faults = [{"kind": "worker_crash", "at_step": 60, "rank": 1},
                  {"kind": "loss_spike", "at_step": 120, "duration": 4},
                  {"kind": "hang", "at_step": 180, "rank": 0},
                  {"kind": "worker_crash", "at_step": 240, "rank": 0}]
        spec = pipeline(name="goodput", size=size_for(False), steps=steps, world_size=2, every=10, faults=faults)
        ours = supervised_run(ctx, "goodput-ours", spec, timeout=900)
        base = raytrain_run(ctx, "goodput-raytrain",
                            pipeline(name="goodput", size=size_for(False), steps=steps, world_size=2, every=10),
                            crashes=crashes, every=10)
    o, ou, ow = goodput(ours.log())
    b, bu, bw = goodput(base["records"])
    faults_per_min = len([i for i in ours.incidents if i.action in ("restart", "rollback")]) / (ow / 60)
    log(f"  ours: {o:.3f} ({ou:.1f}s useful / {ow:.1f}s wall, incidents "
        f"{[(i.kind, i.action) for i in ours.incidents]}); Ray Train: {b:.3f} ({bu:.1f}s / {bw:.1f}s)")
    return {"goodput": Measurement(o, b, "ratio", "Ray Train TorchTrainer, same crashes (no spike/hang handling)",
                                   higher_is_better=True,
                                   extra={"ours_wall_s": ow, "baseline_wall_s": bw, "faults_per_minute": faults_per_min})}
