"""A node lost under a training run, on a real multi-node Ray cluster on this machine.

Run by tests/integration/multinode/test_node_loss.py in a process of its own (the test
session's Ray is one local instance; a `ray.cluster_utils.Cluster` needs its own driver):

    python -m tests.integration.multinode.node_loss_scenario STATE_DIR

The cluster: a head node with 0 CPUs (the supervisor's driver attaches there) and two worker
nodes with 2 CPUs each, every node its own raylet (cluster_utils starts the head on a free
port, never Redis's 6379). The supervisor is the real embedded one, connected through the
cluster's address ($RAY_ADDRESS). A 2-rank pretraining run, its ranks SPREAD over the worker
nodes; once it has reported a checkpoint and trained past it, the node hosting rank 1 is
removed. The last stdout line is a JSON object with what happened (the test asserts on it).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

STEPS = 40
EVERY = 5
STEP_DELAY = 0.08
# GCS health checks every 0.5 s, a node dead after 3 misses: the loss is known in ~2 s, not ~15 s
FAST_HEALTH = {"health_check_period_ms": 500, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3,
               "health_check_initial_delay_ms": 0}


def wait(what: str, cond: Any, timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def spec() -> Any:
    from trainguard.workers.spec import parse_pipeline

    return parse_pipeline({
        "name": "multinode", "seed": 5,
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 32},
        "checkpoint": {"every": EVERY, "keep_last": 100},
        "stages": [{"name": "pretrain", "kind": "pretrain", "steps": STEPS, "world_size": 2, "batch_size": 8,
                    "lr": 3e-3, "warmup_steps": 5, "eval_every": 1000, "eval_batches": 1,
                    "step_delay": STEP_DELAY, "placement": {"strategy": "SPREAD", "cpus_per_rank": 1}}],
    })


def main(state_dir: Path) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    from trainguard.service.app import embedded_supervisor
    from trainguard.service.config import Settings
    from trainguard.service.db import crud

    out: dict[str, Any] = {}
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_HEALTH})
    try:
        workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
        out["cluster_s"] = round(time.monotonic() - t0, 2)
        out["head_node"] = cluster.head_node.node_id
        out["worker_nodes"] = [w.node_id for w in workers]
        os.environ["RAY_ADDRESS"] = cluster.address  # the supervisor connects through the address
        settings = Settings(state_dir=state_dir, environment="development", watch_interval=0.25, hang_timeout=20.0)
        with embedded_supervisor(settings) as ctl:
            out["connected_to"] = ray.get_runtime_context().gcs_address
            run_id = ctl.submit(spec(), actor="test")

            def group() -> Any:
                d = ctl.drivers.get(run_id)
                return d.running_stage().group if d is not None and d.running_stage() is not None else None

            def checkpoints() -> list[Any]:
                with ctl.session() as s:
                    return crud.list_checkpoints(s, run_id=run_id, good_only=True)

            first = wait("the first group", group, 120)
            out["first_group_s"] = round(time.monotonic() - t0, 2)
            eps = first.endpoints()
            out["first_endpoints_s"] = round(time.monotonic() - t0, 2)
            out["first_nodes"] = [e["node"] for e in eps]
            out["first_warm_spares"] = first.warm_spares
            # a checkpoint reported, and training gone on past it: the loss costs steps
            ck = wait("a reported checkpoint", lambda: checkpoints(), 120)
            out["first_checkpoint_s"] = round(time.monotonic() - t0, 2)
            wait("a step past it", lambda: (ctl.drivers[run_id].active.last_step or 0) >= ck[-1].step + 3, 60)
            victim_id = eps[1]["node"]
            victim = next(w for w in workers if w.node_id == victim_id)
            out["removed_node"] = victim_id
            out["step_at_removal"] = ctl.drivers[run_id].active.last_step
            out["newest_checkpoint_at_removal"] = max(c.step for c in checkpoints())
            t_rm = time.monotonic()
            cluster.remove_node(victim)
            out["removed_at_s"] = round(t_rm - t0, 2)

            def incident() -> Any:
                with ctl.session() as s:
                    incs = [i for i in crud.list_incidents(s, run_id=run_id) if i.kind in ("node_lost", "worker_lost")]
                return incs[0] if incs and incs[0].action else None

            inc = wait("the incident", incident, 90, interval=0.02)
            # read at once: the restarted group (its model, a checkpoint load) writes nothing for seconds
            out["checkpoints_at_incident"] = sorted({c.step for c in checkpoints()})
            out["incident_after_s"] = round(time.monotonic() - t_rm, 2)
            second = wait("the restarted group", lambda: (g := group()) is not None and g is not first and g, 120)
            out["restart_group_after_s"] = round(time.monotonic() - t_rm, 2)
            out["restart_nodes"] = [e["node"] for e in second.endpoints()]
            out["restart_endpoints_after_s"] = round(time.monotonic() - t_rm, 2)
            out["restart_warm_spares"] = second.warm_spares
            state = wait("the run's end", lambda: (st := crud_state(ctl, run_id)) in
                         ("completed", "failed", "stopped", "needs_attention") and st, 180, interval=0.2)
            out["run_state"] = state
            out["run_end_s"] = round(time.monotonic() - t0, 2)
            with ctl.session() as s:
                incs = crud.list_incidents(s, run_id=run_id)
                events = [(e.kind, e.result) for e in crud.list_events(s, run_id=run_id)]
            out["incidents"] = [{"kind": i.kind, "action": i.action, "outcome": i.outcome,
                                 "rollback_to_step": i.rollback_to_step, "onset_step": i.onset_step,
                                 "recovery_seconds": i.recovery_seconds, "evidence": i.evidence} for i in incs]
            out["events"] = [k for k, _ in events]
            out["first_steps_after_restart"] = steps_after_restart(state_dir, run_id)
            out["alive_nodes_at_end"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    finally:
        t_down = time.monotonic()
        try:
            ray.shutdown()
        finally:
            cluster.shutdown()
        out["teardown_s"] = round(time.monotonic() - t_down, 2)
    out["total_s"] = round(time.monotonic() - t0, 2)
    return out


def crud_state(ctl: Any, run_id: str) -> str:
    from trainguard.service.db import crud

    with ctl.session() as s:
        return str(crud.get_run(s, run_id=run_id).state)


def steps_after_restart(state_dir: Path, run_id: str) -> dict[str, Any]:
    """From rank 0's per-step log: the first step trained after the restart (the step counter
    went back or repeated), i.e. the step the new group resumed at."""
    from trainguard.workers.runtime.harness import metrics_log_path

    path = metrics_log_path(state_dir, run_id, "pretrain", 0)
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "step" in rec and not rec.get("eval") and "step_seconds" in rec:
            steps.append(int(rec["step"]))
    for prev, cur in zip(steps, steps[1:]):
        if cur <= prev:
            return {"resumed_at_step": cur, "last_before": prev, "final_step": steps[-1]}
    return {"resumed_at_step": None, "final_step": steps[-1] if steps else None}


if __name__ == "__main__":
    try:
        result = main(Path(sys.argv[1]))
    except BaseException as e:  # noqa: BLE001 - the test reads the reason from the JSON line
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=30)}
    sys.stdout.flush()
    print("\nRESULT " + json.dumps(result, default=str), flush=True)
