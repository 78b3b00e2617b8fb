"""recovery_node_loss on a multi-node Ray cluster of its own, in a process of its own (run by
tests/bench/b_node_loss.py; the benchmark runner's Ray is one local instance, and a process is
connected to one Ray at a time):

    python -m tests.bench.node_loss_bench_scenario {all|ours|raytrain} OUT_DIR [--smoke] [--at STEP]

`all`: one cluster, ours then Ray Train; before Ray Train the removed node is replaced by a new
one (the same shape again), and its removal comes at the step ours' came at.

The cluster (ray.cluster_utils, every node its own raylet on this machine; the head on a free
port, never Redis's 6379): a head with 0 CPUs (the driver: our supervisor, or Ray Train's
controller, which Ray Train pins to the driver's node) and three worker nodes with 1 CPU each.
A 2-rank pretraining group, one CPU per rank, SPREAD: the ranks sit on two worker nodes, the
third is the spare, so after the removal both systems have the 2 CPUs they need. GCS health
checks are the integration scenarios' fast ones (a dead node is known in ~2 s) for both.

The removal: once rank 0's per-step log shows a step >= `--at` that is 3..7 steps past a
checkpoint (every 10 steps), the node hosting rank 1 is removed (`Cluster.remove_node`, its
raylet and every process on it killed); the removal time is `time.time()` just before.
Recovered: the first record in rank 0's log after the removal whose step went back or repeated
(the restarted group resumes from its checkpoint).

- ours: the real supervisor (`embedded_supervisor`, default settings) connected through the
  cluster's address (on a cluster: detached workers, `detached_workers: auto`), its warm pool
  sized by the caller ($TRAINGUARD_WARM_WORKERS). The removal does not wait for the pool to
  refill after the first group took its spares: its state at the removal is recorded
  (`pool_at_removal`). Afterwards the detached actors it leaves are killed.
- raytrain: `TorchTrainer` + `FailureConfig(max_failures=1)` (tests/bench/raytrain.py), the
  same model, batch and checkpoint interval.

The last stdout line is `RESULT {json}` ({"ours": {...}, "raytrain": {...}, ...}): times in a
side's `timeline` and `recovery_s` are seconds after its removal.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from tests.integration.multinode.node_loss_scenario import FAST_HEALTH, wait

SIDES = ("ours", "raytrain")  # the order `all` runs them in
EVERY = 10
WORKER_NODES = 3
CONFIRM_STEPS = 3  # ours: steps trained after the first one after recovery, before the scenario ends
TAIL_STEPS = 30  # Ray Train: steps planned after the removal step (it trains to the end)


def due(step: int, at: int) -> bool:
    """The removal step: >= at, and 3..7 steps past a checkpoint (both sides lose about as much)."""
    return step >= at and 3 <= step % EVERY <= EVERY - 3


def steps_of(path: Path) -> list[dict]:
    from tests.bench.core import read_jsonl, step_records

    return step_records(read_jsonl(path))


def after_removal(records: list[dict], removed: float) -> dict | None:
    from tests.bench.b_recovery import first_after_kill

    return first_after_kill(records, removed)


def spec(smoke: bool, steps: int) -> Any:
    from tests.bench.workload import pipeline, size_for
    from trainguard.workers.spec import parse_pipeline

    d = pipeline(name="nodeloss", size=size_for(smoke), steps=steps, world_size=2, every=EVERY,
                 keep_last=100).model_dump(mode="json")
    d["stages"][0]["placement"] = {"strategy": "SPREAD", "cpus_per_rank": 1}
    return parse_pipeline(d)


def cluster_up() -> tuple[Any, list[Any]]:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_HEALTH})
    workers = [cluster.add_node(num_cpus=1) for _ in range(WORKER_NODES)]
    cluster.wait_for_nodes(timeout=120)  # a loaded machine: four raylets take a while
    return cluster, workers


def pool_state() -> dict[str, Any]:
    """This process's warm pool: its size, the idle spares, those done warming up."""
    import ray

    from trainguard.workers.group import warm_pool

    pool = warm_pool()
    try:
        with pool._lock:  # a read-only look at the pool's spares (internals: best effort)
            refs = [entry[1] for entry in pool._idle]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        return {"size": pool.size, "error": repr(e)}
    return {"size": pool.size, "idle": len(refs), "warm": len(done)}


def kill_detached() -> int:
    """Detached mode: the run's ranks, the spares and their placement groups outlive the
    supervisor. Kill every named actor in its namespace and remove its named placement groups
    (what `reap_detached` does, without asking each actor who it is first: nothing is kept)."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    from trainguard.workers.group import DETACHED_NAMESPACE

    n = 0
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a.get("namespace") != DETACHED_NAMESPACE:
            continue
        try:
            ray.kill(ray.get_actor(a["name"], namespace=DETACHED_NAMESPACE), no_restart=True)
            n += 1
        except Exception:  # noqa: BLE001 - gone meanwhile
            pass
    for pg_id, info in placement_group_table().items():
        if info.get("name") and info.get("state") != "REMOVED":
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            except Exception:  # noqa: BLE001 - removed meanwhile
                pass
    return n


def ts(dt: Any) -> float:
    from tests.bench.shared import ts as _ts

    return _ts(dt)


def cpus_free() -> None:
    """After another side on the same cluster: every CPU free again (its actors ended with it)."""
    import ray

    wait("the cluster's CPUs free", lambda: ray.available_resources().get("CPU", 0) >= WORKER_NODES, 120,
         interval=0.2)


def ours(cluster: Any, workers: list[Any], out_dir: Path, smoke: bool, at: int) -> dict[str, Any]:
    import ray

    from trainguard.service.app import embedded_supervisor
    from trainguard.service.config import Settings
    from trainguard.service.db import crud
    from trainguard.workers.runtime.harness import metrics_log_path

    out: dict[str, Any] = {"side": "ours"}
    t0 = time.monotonic()
    try:
        os.environ["RAY_ADDRESS"] = cluster.address
        with embedded_supervisor(Settings(state_dir=out_dir / "state", environment="development")) as ctl:
            out["detached"] = ctl.detached
            cpus_free()
            run_id = ctl.submit(spec(smoke, 100_000), actor="bench")
            logp = metrics_log_path(out_dir / "state", run_id, "pretrain", 0)

            def group() -> Any:
                d = ctl.drivers.get(run_id)
                return d.running_stage().group if d is not None and d.running_stage() is not None else None

            first = wait("the first group", group, 180)
            eps = first.endpoints()
            out["first_nodes"] = [e["node"] for e in eps]
            out["first_warm_spares"] = first.warm_spares
            wait("the first step", lambda: steps_of(logp), 180)
            out["first_step_s"] = round(time.monotonic() - t0, 2)
            last = wait("the removal step", lambda: (s := steps_of(logp)) and due(int(s[-1]["step"]), at) and s[-1],
                        300, interval=0.005)
            victim = next(w for w in workers if w.node_id == eps[1]["node"])
            out["step_at_removal"] = int(last["step"])
            out["removed_node"] = victim.node_id
            out["pool_at_removal"] = pool_state()
            removed = time.time()
            cluster.remove_node(victim)
            out["remove_call_s"] = round(time.time() - removed, 3)
            rec = wait("the first step after recovery", lambda: after_removal(steps_of(logp), removed), 300,
                       interval=0.02)
            out["recovery_s"] = rec["time"] - removed
            out["resumed_at_step"] = int(rec["step"])
            wait("a few more steps", lambda: int(steps_of(logp)[-1]["step"]) >= int(rec["step"]) + CONFIRM_STEPS, 120)
            second = group()
            out["restart_nodes"] = [e["node"] for e in second.endpoints()] if second is not None else None
            out["restart_warm_spares"] = second.warm_spares if second is not None else None
            with ctl.session() as s:
                incs = crud.list_incidents(s, run_id=run_id)
                events = crud.list_events(s, run_id=run_id)
            out["incidents"] = [{"kind": i.kind, "action": i.action, "outcome": i.outcome,
                                 "rollback_to_step": i.rollback_to_step, "recovery_seconds": i.recovery_seconds,
                                 "detected_after_s": round(ts(i.detected_at) - removed, 3)} for i in incs]
            out["timeline"] = [{"kind": e.kind, "after_s": round(ts(e.at) - removed, 3)}
                               for e in events if ts(e.at) >= removed - 1]
            out["alive_nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    finally:
        t_down = time.monotonic()
        try:
            if ray.is_initialized():
                out["killed_detached"] = kill_detached()
        finally:
            ray.shutdown()  # whatever is not detached goes with its owner
        out["disconnect_s"] = round(time.monotonic() - t_down, 2)
    out["total_s"] = round(time.monotonic() - t0, 2)
    return out


def raytrain(cluster: Any, workers: list[Any], out_dir: Path, smoke: bool, at: int) -> dict[str, Any]:
    import ray

    from tests.bench.raytrain import rank_nodes, run_raytrain_on_cluster

    out: dict[str, Any] = {"side": "raytrain"}
    t0 = time.monotonic()
    logs = out_dir / "logs"
    state: dict[str, Any] = {}

    def remove_rank1_node() -> None:
        try:
            logp = logs / "rank0.jsonl"
            wait("the first step", lambda: steps_of(logp), 300)
            state["first_step_s"] = round(time.monotonic() - t0, 2)
            last = wait("the removal step", lambda: (s := steps_of(logp)) and due(int(s[-1]["step"]), at) and s[-1],
                        300, interval=0.005)
            node = next(r["node"] for r in reversed(rank_nodes(logs)) if r["rank"] == 1)
            victim = next(w for w in workers if w.node_id == node)
            state["first_nodes"] = sorted({r["node"] for r in rank_nodes(logs)})
            state["step_at_removal"] = int(last["step"])
            state["removed_node"] = node
            state["removed"] = time.time()
            cluster.remove_node(victim)
            state["remove_call_s"] = round(time.time() - state["removed"], 3)
        except BaseException as e:  # noqa: BLE001 - reported in the result
            state["monitor_error"] = f"{type(e).__name__}: {e}"

    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONHASHSEED": "0", "RAY_USAGE_STATS_ENABLED": "0"}})
        cpus_free()
        out["cpus_free_after_s"] = round(time.monotonic() - t0, 2)
        monitor = threading.Thread(target=remove_rank1_node, daemon=True)
        monitor.start()
        # its own steps: `at` is where ours' removal came; it trains on to TAIL_STEPS past it
        steps = (at // EVERY + 1) * EVERY + TAIL_STEPS
        try:
            res = run_raytrain_on_cluster(spec(smoke, steps), out_dir, every=EVERY, max_failures=1)
            out["fit_error"] = repr(res["error"]) if res["error"] is not None else None
        except Exception as e:  # noqa: BLE001 - a failed fit: the log still says what was trained
            out["fit_error"] = f"{type(e).__name__}: {e}"
        monitor.join(timeout=5)
        out.update({k: v for k, v in state.items() if k != "removed"})
        removed = state.get("removed")
        if removed is None:
            raise RuntimeError(f"the node was never removed ({state.get('monitor_error')}; fit: {out['fit_error']})")
        records = steps_of(logs / "rank0.jsonl")
        rec = after_removal(records, removed)
        if rec is None:
            raise RuntimeError(f"no step after the removal (fit: {out['fit_error']})")
        out["recovery_s"] = rec["time"] - removed
        out["resumed_at_step"] = int(rec["step"])
        out["final_step"] = int(records[-1]["step"])
        out["planned_steps"] = steps
        # each attempt of the training function wrote its node per rank when it started
        out["timeline"] = [{"kind": f"rank{r['rank']}_function_started", "after_s": round(r["time"] - removed, 3)}
                           for r in rank_nodes(logs) if r["time"] > removed]
        out["restart_nodes"] = sorted({r["node"] for r in rank_nodes(logs) if r["time"] > removed})
        out["alive_nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    finally:
        t_down = time.monotonic()
        ray.shutdown()
        out["disconnect_s"] = round(time.monotonic() - t_down, 2)
    out["total_s"] = round(time.monotonic() - t0, 2)
    return out


def main(sides: list[str], out_dir: Path, smoke: bool, at: int) -> dict[str, Any]:
    """One cluster for the sides, in turn; before each but the first, the removed node is replaced
    by a new one (the same shape: three 1-CPU worker nodes). The later sides' removals come at the
    step the first side's came at."""
    result: dict[str, Any] = {}
    t0 = time.monotonic()
    cluster, workers = cluster_up()
    result["cluster_s"] = round(time.monotonic() - t0, 2)
    try:
        for i, side in enumerate(sides):
            if i:
                t_add = time.monotonic()
                workers[:] = [w for w in workers if w in cluster.worker_nodes]
                while len(workers) < WORKER_NODES:
                    workers.append(cluster.add_node(num_cpus=1))
                cluster.wait_for_nodes(timeout=120)
                result[f"node_replaced_before_{side}_s"] = round(time.monotonic() - t_add, 2)
            (out_dir / side).mkdir(parents=True, exist_ok=True)
            r = (ours if side == "ours" else raytrain)(cluster, workers, out_dir / side, smoke, at)
            result[side] = r
            if i == 0:
                at = int(r["step_at_removal"])
    finally:
        t_down = time.monotonic()
        cluster.shutdown()
        result["teardown_s"] = round(time.monotonic() - t_down, 2)
    result["total_s"] = round(time.monotonic() - t0, 2)
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("sides", choices=("all", *SIDES))
    p.add_argument("out_dir", type=Path)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--at", type=int, default=30, help="the removal comes at the first step >= this one (see due)")
    a = p.parse_args()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = main(list(SIDES) if a.sides == "all" else [a.sides], a.out_dir, a.smoke, a.at)
    except BaseException as e:  # noqa: BLE001 - the benchmark reads the reason from the JSON line
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=30)}
    sys.stdout.flush()
    print("\nRESULT " + json.dumps(result, default=str), flush=True)
