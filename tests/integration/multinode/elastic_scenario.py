"""Elastic restart on a real multi-node Ray cluster on this machine: a node lost under a 2-rank
stage with `min_world_size: 1`, and the cluster left with CPUs for one rank only.

Run by tests/integration/multinode/test_elastic_restart.py in a process of its own (as
node_loss_scenario.py, whose helpers it shares):

    python -m tests.integration.multinode.elastic_scenario STATE_DIR

The cluster: a head with 0 CPUs and two worker nodes with 1 CPU each. A 2-rank pretraining run
(one rank per worker node: a bundle of 1 CPU each) trains steps 1..HANG_AT — rank 1 then hangs
(an injected fault), so the group stops at a known step, past its checkpoint at step
NEWEST_CHECKPOINT — and the node hosting rank 1 is removed. The restarted group cannot have 2
ranks (one CPU is left in the cluster), so it restarts at 1 from the newest good checkpoint and
trains to the end. The last stdout line is a JSON object with what happened; the rank logs are
left in STATE_DIR.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from tests.integration.multinode.node_loss_scenario import FAST_HEALTH, crud_state, wait

STEPS = 24
EVERY = 4
STEP_DELAY = 0.08
BATCH = 8
ELASTIC_WAIT_S = 1.0  # how long the restart waits for its full size before it shrinks
HANG_AT = 10  # rank 1 hangs at this batch: the 2-rank group trains steps 1..HANG_AT, no more
NEWEST_CHECKPOINT = HANG_AT // EVERY * EVERY  # the newest checkpoint before it (step 8)


def spec() -> Any:
    from trainguard.workers.spec import parse_pipeline

    return parse_pipeline({
        "name": "elastic", "seed": 7,
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 32},
        "checkpoint": {"every": EVERY, "keep_last": 100},
        "stages": [{"name": "pretrain", "kind": "pretrain", "steps": STEPS, "world_size": 2, "min_world_size": 1,
                    "batch_size": BATCH, "lr": 3e-3, "warmup_steps": 4, "eval_every": 1000, "eval_batches": 1,
                    "step_delay": STEP_DELAY, "placement": {"strategy": "SPREAD", "cpus_per_rank": 1},
                    "faults": [{"kind": "hang", "at_step": HANG_AT, "rank": 1}]}],
    })


def main(state_dir: Path) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    from trainguard.service.app import embedded_supervisor
    from trainguard.service.config import Settings
    from trainguard.service.db import crud
    from trainguard.workers.group import ELASTIC_WAIT_ENV

    os.environ[ELASTIC_WAIT_ENV] = str(ELASTIC_WAIT_S)
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_HEALTH})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        out["cluster_s"] = round(time.monotonic() - t0, 2)
        os.environ["RAY_ADDRESS"] = cluster.address
        settings = Settings(state_dir=state_dir, environment="development", watch_interval=0.25, hang_timeout=20.0)
        with embedded_supervisor(settings) as ctl:
            run_id = ctl.submit(spec(), actor="test")
            out["run_id"] = run_id

            def group() -> Any:
                d = ctl.drivers.get(run_id)
                return d.running_stage().group if d is not None and d.running_stage() is not None else None

            def checkpoints() -> list[Any]:
                with ctl.session() as s:
                    return crud.list_checkpoints(s, run_id=run_id, good_only=True)

            first = wait("the first group", group, 120)
            eps = first.endpoints()
            out["first_world_size"] = first.world_size
            out["first_ranks"] = len(eps)
            wait("the checkpoint before the hang", lambda: any(c.step == NEWEST_CHECKPOINT for c in checkpoints()), 120)
            out["checkpoint_s"] = round(time.monotonic() - t0, 2)
            wait("the group at the hang", lambda: (ctl.drivers[run_id].active.last_step or 0) >= HANG_AT, 60)
            victim = next(w for w in workers if w.node_id == eps[1]["node"])
            cluster.remove_node(victim)
            t_rm = time.monotonic()
            out["removed_at_s"] = round(t_rm - t0, 2)
            second = wait("the restarted group", lambda: (g := group()) is not None and g is not first and g, 120)
            out["restart_group_after_s"] = round(time.monotonic() - t_rm, 2)
            out["restart_world_size"] = second.world_size
            out["restart_ranks"] = len(second.endpoints())
            out["restart_elastic"] = second.elastic
            active = ctl.drivers[run_id].running_stage()
            out["stage_view"] = {"world_size": active.world_size, "declared": active.declared_world_size,
                                 "targets": len(active.targets)}
            state = wait("the run's end", lambda: (st := crud_state(ctl, run_id)) in
                         ("completed", "failed", "stopped", "needs_attention") and st, 180, interval=0.2)
            out["run_state"] = state
            out["run_end_s"] = round(time.monotonic() - t0, 2)
            with ctl.session() as s:
                incs = crud.list_incidents(s, run_id=run_id)
                events = crud.list_events(s, run_id=run_id)
                final = [c for c in crud.list_checkpoints(s, run_id=run_id, good_only=True) if c.step == STEPS]
            out["incidents"] = [{"kind": i.kind, "action": i.action, "outcome": i.outcome,
                                 "rollback_to_step": i.rollback_to_step} for i in incs]
            out["events"] = [{"kind": e.kind, "result": e.result, "detail": e.detail} for e in events]
            out["final_checkpoint_state"] = (json.loads((Path(final[0].path) / "state.json").read_text())
                                             if final else None)
            t_down = time.monotonic()
        out["supervisor_exit_s"] = round(time.monotonic() - t_down, 2)
    finally:
        t_down = time.monotonic()
        try:
            ray.shutdown()
        finally:
            cluster.shutdown()
        out["teardown_s"] = round(time.monotonic() - t_down, 2)
    out["total_s"] = round(time.monotonic() - t0, 2)
    return out


if __name__ == "__main__":
    try:
        result = main(Path(sys.argv[1]))
    except BaseException as e:  # noqa: BLE001 - the test reads the reason from the JSON line
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=30)}
    sys.stdout.flush()
    print("\nRESULT " + json.dumps(result, default=str), flush=True)
