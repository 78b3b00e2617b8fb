"""Recovery time: after a worker crash (vs Ray Train) and after a loss spike (vs stop + restart).

recovery_worker_crash — 2 data-parallel ranks, checkpoint every 10 steps, rank 1's
process dies (`os._exit(1)`) just before it trains batch `at_step` (45 full, 25 smoke).
Ours: the real supervisor (`Controller` + scheduler, embedded scrape path) notices the
dead worker, records the incident and restarts the group from the newest good
checkpoint. Baseline: Ray Train `TorchTrainer` with `FailureConfig(max_failures=1)`
(tests/bench/raytrain.py). Time: from the kill (the fault's marker file, written just
before `os._exit`) to the first training step completed after recovery, read from
rank 0's per-step log; steps lost = completed steps at the kill - the step resumed from.
At smoke size (structure only) no Ray Train run: the baseline is the same supervised run's
first start (submit -> first step), a group started from nothing as Ray Train's restart is.

recovery_loss_spike — 2 ranks, a corrupted-batch loss spike at `at_step`; once it is
visible the decision is taken (roll back to the newest checkpoint before the onset,
skip the bad batches, halve the LR). Ours: one `ROLLBACK` control message, applied
in the same worker processes at the next agreed step boundary. Baseline: what every
other tool does — shut the worker group down and start a new one from that
checkpoint with the same skip list and LR. Time: from the decision to the first step
completed after the rollback. A second row, `recovery_loss_spike_budget`, sets ours against
what a rollback cannot avoid: two step times (the step in flight when the control arrives, and
the first step after) plus one verified load of the checkpoint, both measured in the same run
(the median step time before the spike; the median of three loads of the same checkpoint,
read, hashed against its manifest and deserialised, after the run).
"""
from __future__ import annotations

import statistics
import time

from tests.bench.core import Context, Measurement, benchmark, ensure_ray, log, read_jsonl, step_records, wait_until
from tests.bench.workload import metrics_log, pipeline, size_for


def first_after_kill(records: list[dict], kill: float) -> dict | None:
    """The first step completed after recovery: the first record, after the kill, where the step
    counter went back or repeated (the restarted group replays from its checkpoint)."""
    recs = step_records(records)
    for prev, r in zip(recs, recs[1:]):
        if r["time"] > kill and int(r["step"]) <= int(prev["step"]):
            return r
    return None


def _crash_figures(records: list[dict], kill: float | None, at: int, who: str) -> tuple[float, int]:
    if kill is None:
        raise RuntimeError(f"{who}: the crash never fired")
    rec = first_after_kill(records, kill)
    if rec is None:
        raise RuntimeError(f"{who}: no step completed after the kill")
    return rec["time"] - kill, at - (int(rec["step"]) - 1)


@benchmark("recovery_worker_crash", reps=5, smoke_reps=1, uses_ray=True)
def recovery_worker_crash(ctx: Context) -> dict[str, Measurement]:
    """Kill -> first step after recovery, 2-rank group (ours: supervisor restart; Ray Train FailureConfig)."""
    from tests.bench.shared import SMOKE_CRASH, first_start_s, raytrain_run, smoke_run, supervised_run

    if ctx.smoke:  # structure only: Ray Train runs at full size; the baseline is a cold group start
        ours = smoke_run(ctx)
        o, o_lost = _crash_figures(ours.log(), ours.fired("worker_crash"), SMOKE_CRASH[0], "ours")
        log(f"  ours: {o:.2f}s, {o_lost} steps lost")
        return {"recovery_worker_crash": Measurement(
            o, first_start_s(ours), "s", "smoke: the same run's first start, submit -> first step (no Ray Train run)",
            extra={"ours_steps_lost": o_lost})}
    else:
        from trainguard.workers.group import warm_pool

        # the deployment's sizing for restarts that find warm spares: the first start takes one
        # group's worth, and a restart moments later needs another (docs/operations.md)
        pool = warm_pool()
        pool.size = max(pool.size, 4)
        at, steps = 45, 70
        spec = pipeline(name="crash", size=size_for(False), steps=steps, world_size=2, every=10,
                        faults=[{"kind": "worker_crash", "at_step": at, "rank": 1}])
        ours = supervised_run(ctx, "crash-ours", spec)
        base = raytrain_run(ctx, "crash-raytrain", pipeline(name="crash", size=size_for(False), steps=steps,
                                                            world_size=2, every=10), crashes=[(at, 1)], every=10)
    o, o_lost = _crash_figures(ours.log(), ours.fired("worker_crash"), at, "ours")
    log(f"  ours: {o:.2f}s, {o_lost} steps lost")
    b, b_lost = _crash_figures(base["records"], base["kill"], at, "Ray Train")
    log(f"  Ray Train: {b:.2f}s, {b_lost} steps lost")
    return {"recovery_worker_crash": Measurement(o, b, "s", "Ray Train TorchTrainer FailureConfig(max_failures=1)",
                                                 extra={"ours_steps_lost": o_lost, "baseline_steps_lost": b_lost})}


def _spike_pair(ctx: Context, at: int) -> tuple[tuple[float, int], tuple[float, int], float, float]:
    """One run: the spike, an in-process rollback (ours); replay to the same step, then the same
    rollback done by stopping the group and starting a new one (baseline). Also the run's median
    step time before the spike and the median of 3 verified loads of the rollback's checkpoint."""
    from trainguard.workers.contract import ControlKind
    from trainguard.workers.runtime.checkpoint import load_checkpoint
    from trainguard.workers.group import WorkerGroup

    state = ctx.sub("spike")
    dur = 3
    spec = pipeline(name="spike", size=size_for(ctx.smoke), steps=5000, world_size=2, every=10, keep_last=100,
                    faults=[{"kind": "loss_spike", "at_step": at, "duration": dur}])
    run_id = "bench-spike"
    logp = metrics_log(state, run_id)
    groups = [WorkerGroup(run_id=run_id, spec=spec, stage_name="pretrain", state_dir=state)]
    groups[0].start()

    def steps() -> list[dict]:
        return step_records(read_jsonl(logp))

    def first_back(decided: float, step: int) -> dict | None:
        return next((r for r in steps() if r["time"] > decided and int(r["step"]) == step + 1), None)

    try:
        wait_until(lambda: any(int(r["step"]) >= at + dur for r in steps()), 180, what="the spike to be trained")
        reported = {r.step: r.ref for r in groups[0].poll()["checkpoints"]}  # as the supervisor registers them
        step = max(s for s in reported if s <= at)
        ck = {"step": step, "ref": reported[step]}
        skip = [[at, at + dur + 2]]
        # ours: one control message, applied in the same processes
        decided = time.time()
        reached = max(int(r["step"]) for r in steps())
        groups[0].control(ControlKind.ROLLBACK, {"checkpoint": ck["ref"].to_dict(), "skip": skip, "lr_multiplier": 0.5})
        rec = wait_until(lambda: first_back(decided, ck["step"]), 180, what="the first step after the rollback")
        ours = (rec["time"] - decided, reached - ck["step"])
        # replay to the same step, then the baseline: stop the group, start a new one from the checkpoint
        wait_until(lambda: max(int(r["step"]) for r in steps() if r["time"] > rec["time"] - 1e-6) >= reached, 180,
                   what="the replay to reach the decision step again")
        decided = time.time()
        reached2 = max(int(r["step"]) for r in steps())
        groups[0].shutdown()
        groups.append(WorkerGroup(run_id=run_id, spec=spec, stage_name="pretrain", state_dir=state,
                                  resume_from=ck["ref"], skip=skip, lr_multiplier=0.5))
        groups[1].start()
        rec = wait_until(lambda: first_back(decided, ck["step"]), 180, what="the first step of the new group")
        base = (rec["time"] - decided, reached2 - ck["step"])
    finally:
        for g in groups:
            g.shutdown()
    # the budget's parts, from this run: its step time before the spike, and a verified load of
    # the same checkpoint (read, BLAKE3 of every file against the reported hashes, torch.load)
    step_s = statistics.median(float(r["step_seconds"]) for r in steps() if int(r["step"]) < at and "step_seconds" in r)
    loads = []
    for _ in range(3):
        t0 = time.perf_counter()
        load_checkpoint(ck["ref"])
        loads.append(time.perf_counter() - t0)
    return ours, base, step_s, statistics.median(loads)


@benchmark("recovery_loss_spike", reps=3, smoke_reps=1, uses_ray=True)
def recovery_loss_spike(ctx: Context) -> dict[str, Measurement]:
    """Decision -> first step after the rollback (ours: in-process ROLLBACK control; baseline: stop + new group)."""
    ensure_ray()
    at = 25 if ctx.smoke else 45
    (o, o_lost), (b, b_lost), step_s, load_s = _spike_pair(ctx, at)
    budget = 2 * step_s + load_s
    log(f"  ours: {o:.3f}s ({o_lost} steps rolled back); restart: {b:.3f}s ({b_lost} steps rolled back); "
        f"budget {budget:.3f}s (step {step_s * 1000:.1f} ms, verified load {load_s * 1000:.1f} ms)")
    return {"recovery_loss_spike": Measurement(o, b, "s", "stop the worker group + start a new one from the checkpoint",
                                               extra={"ours_steps_lost": o_lost, "baseline_steps_lost": b_lost}),
            "recovery_loss_spike_budget": Measurement(o, budget, "s",
                                                      "2 step times + a verified load of the checkpoint (same run)",
                                                      extra={"step_s": step_s, "load_s": load_s})}
