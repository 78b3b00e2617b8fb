"""Recovery time: after a worker crash (vs Ray Train) and after a loss spike (vs stop + restart).

recovery_worker_crash — 2 data-parallel ranks, checkpoint every 10 steps, rank 1's
process dies (`os._exit(1)`) just before it trains batch `at_step` (45 full, 25 smoke).
Ours: the real supervisor (`Controller` + scheduler, embedded scrape path) notices the
dead worker, records the incident and restarts the group from the newest good
checkpoint. Baseline: Ray Train `TorchTrainer` with `FailureConfig(max_failures=1)`
(tests/bench/raytrain.py). Time: from the kill (the fault's marker file, written just
before `os._exit`) to the first training step completed after recovery, read from
rank 0's per-step log; steps lost = completed steps at the kill - the step resumed from.

recovery_loss_spike — 2 ranks, a corrupted-batch loss spike at `at_step`; once it is
visible the decision is taken (roll back to the newest checkpoint before the onset,
skip the bad batches, halve the LR). Ours: one `ROLLBACK` control message, applied
in the same worker processes at the next agreed step boundary. Baseline: what every
other tool does — shut the worker group down and start a new one from that
checkpoint with the same skip list and LR. Time: from the decision to the first step
completed after the rollback.
"""
from __future__ import annotations

import time
from pathlib import Path

from tests.bench.core import Context, Measurement, benchmark, ensure_ray, log, read_jsonl, step_records, wait_until
from tests.bench.workload import fired_time, metrics_log, pipeline, size_for


def first_after_kill(records: list[dict], kill: float) -> dict | None:
    """The first step completed after recovery: the first record, after the kill, where the step
    counter went back or repeated (the restarted group replays from its checkpoint)."""
    recs = step_records(records)
    for prev, r in zip(recs, recs[1:]):
        if r["time"] > kill and int(r["step"]) <= int(prev["step"]):
            return r
    return None


def _ours_crash(ctx: Context, at: int, steps: int) -> tuple[float, int]:
    from tests.integration.supervisor.harness import running_controller, wait_state

    state = ctx.sub("crash-ours")
    spec = pipeline(name="crash", size=size_for(ctx.smoke), steps=steps, world_size=2, every=10,
                    faults=[{"kind": "worker_crash", "at_step": at, "rank": 1}])
    with running_controller(state) as ctl:
        run_id = ctl.submit(spec, actor="bench")
        st = wait_state(ctl, run_id, timeout=300)
    if st != "completed":
        raise RuntimeError(f"ours: run ended {st!r}, not completed")
    kill = fired_time(state / "runs" / run_id / "faults", "worker_crash")
    if kill is None:
        raise RuntimeError("ours: the crash never fired")
    rec = first_after_kill(read_jsonl(metrics_log(state, run_id)), kill)
    if rec is None:
        raise RuntimeError("ours: no step after the kill")
    return rec["time"] - kill, at - (int(rec["step"]) - 1)


def _raytrain_crash(ctx: Context, at: int, steps: int) -> tuple[float, int]:
    from tests.bench.raytrain import run_raytrain

    d = ctx.sub("crash-raytrain")
    spec = pipeline(name="crash", size=size_for(ctx.smoke), steps=steps, world_size=2, every=10)
    res = run_raytrain(spec, d, crashes=[(at, 1)], every=10, max_failures=1)
    kill = fired_time(res["fired_dir"], "worker_crash")
    if kill is None:
        raise RuntimeError(f"Ray Train: the crash never fired ({res['error']})")
    rec = first_after_kill(read_jsonl(res["log"]), kill)
    if rec is None:
        raise RuntimeError(f"Ray Train: no step after the kill ({res['error']})")
    return rec["time"] - kill, at - (int(rec["step"]) - 1)


@benchmark("recovery_worker_crash", reps=2, smoke_reps=1, uses_ray=True)
def recovery_worker_crash(ctx: Context) -> dict[str, Measurement]:
    """Kill -> first step after recovery, 2-rank group (ours: supervisor restart; Ray Train FailureConfig)."""
    ensure_ray()
    at, steps = (25, 35) if ctx.smoke else (45, 70)
    o, o_lost = _ours_crash(ctx, at, steps)
    log(f"  ours: {o:.2f}s, {o_lost} steps lost")
    b, b_lost = _raytrain_crash(ctx, at, steps)
    log(f"  Ray Train: {b:.2f}s, {b_lost} steps lost")
    return {"recovery_worker_crash": Measurement(o, b, "s", "Ray Train TorchTrainer FailureConfig(max_failures=1)",
                                                 extra={"ours_steps_lost": o_lost, "baseline_steps_lost": b_lost})}


def _spike_once(ctx: Context, *, in_process: bool, at: int) -> tuple[float, int]:
    from workers.contract import ControlKind
    from workers.group import WorkerGroup
    from workers.runtime.checkpoint import list_checkpoints, stage_root

    name = "spike-ours" if in_process else "spike-restart"
    state = ctx.sub(name)
    dur = 3
    spec = pipeline(name=name, size=size_for(ctx.smoke), steps=5000, world_size=2, every=10, keep_last=100,
                    faults=[{"kind": "loss_spike", "at_step": at, "duration": dur}])
    run_id = f"bench-{name}"
    group = WorkerGroup(run_id=run_id, spec=spec, stage_name="pretrain", state_dir=state)
    group.start()
    new = None
    try:
        logp = metrics_log(state, run_id)
        wait_until(lambda: any(int(r["step"]) >= at + dur for r in step_records(read_jsonl(logp))), 180,
                   what="the spike to be trained")
        root = stage_root(state / "checkpoints", run_id, "pretrain")
        good = [c for c in list_checkpoints(root) if c["step"] <= at]
        ck = good[-1]
        payload = {"checkpoint": ck["path"], "skip": [[at, at + dur + 2]], "lr_multiplier": 0.5}
        decided = time.time()
        at_decision = max(int(r["step"]) for r in step_records(read_jsonl(logp)))
        if in_process:
            group.control(ControlKind.ROLLBACK, payload)
        else:
            group.shutdown()
            new = WorkerGroup(run_id=run_id, spec=spec, stage_name="pretrain", state_dir=state,
                              resume_from=ck["path"], skip=payload["skip"], lr_multiplier=0.5)
            new.start()

        def back() -> dict | None:
            for r in step_records(read_jsonl(logp)):
                if r["time"] > decided and int(r["step"]) == ck["step"] + 1:
                    return r
            return None

        rec = wait_until(back, 180, what="the first step after the rollback")
        return rec["time"] - decided, at_decision - ck["step"]
    finally:
        group.shutdown()
        if new is not None:
            new.shutdown()


@benchmark("recovery_loss_spike", reps=3, smoke_reps=1, uses_ray=True)
def recovery_loss_spike(ctx: Context) -> dict[str, Measurement]:
    """Decision -> first step after the rollback (ours: in-process ROLLBACK control; baseline: stop + new group)."""
    ensure_ray()
    at = 25 if ctx.smoke else 45
    o, o_lost = _spike_once(ctx, in_process=True, at=at)
    log(f"  ours: {o:.3f}s ({o_lost} steps rolled back)")
    b, b_lost = _spike_once(ctx, in_process=False, at=at)
    log(f"  restart: {b:.3f}s ({b_lost} steps rolled back)")
    return {"recovery_loss_spike": Measurement(o, b, "s", "stop the worker group + start a new one from the checkpoint",
                                               extra={"ours_steps_lost": o_lost, "baseline_steps_lost": b_lost})}
