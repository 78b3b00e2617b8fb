"""Recovery time after a lost Ray node: ours (the supervisor's `node_lost` restart) vs Ray Train.

recovery_node_loss — a multi-node Ray cluster on this machine (`ray.cluster_utils`: a head with 0
CPUs and three 1-CPU worker nodes, each its own raylet; fast GCS health checks, as in
tests/integration/multinode), a 2-rank pretraining group (`small` GPT, one CPU per rank,
SPREAD, checkpoint every 10 steps) on two of the worker nodes; the third is the spare both
systems need to restart at full size. The node hosting rank 1 is removed
(`Cluster.remove_node`: its raylet and every process on it killed) once rank 0's log shows a
step 3..7 past a checkpoint (>= 30; Ray Train's at the step ours' came at).
Ours: the real supervisor (`embedded_supervisor`, default settings: on a cluster that is
detached workers) records the `node_lost` incident and restarts the group from the newest good
checkpoint on the live nodes; its warm pool has one spare per worker node
(TRAINGUARD_WARM_WORKERS=3), in whatever state it is at the removal (recorded). Baseline: Ray
Train `TorchTrainer` with `FailureConfig(max_failures=1)` (tests/bench/raytrain.py), same
model, batch, checkpoint interval and placement, on the same cluster after ours (the removed
node replaced by a new one first). Time: from the removal (`time.time()` just before it) to the
first training step completed after recovery, read from rank 0's per-step log; steps lost =
the step at the removal - the step resumed from. One subprocess per repetition
(tests/bench/node_loss_bench_scenario.py), 2-4 minutes each on the loaded 2-core machine.

Full size only: the smoke run skips the row (starting a four-raylet cluster and our side alone
took 66 s on the loaded 2-core machine, over the smoke budget of ~30 s; the node-loss path is
tested by tests/integration/multinode). At smoke size it checks, without a cluster, that a
scenario result turns into the row.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.core import Context, Measurement, benchmark, log

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 720
BASELINE = "Ray Train TorchTrainer FailureConfig(max_failures=1), spare node"


def measurement(r: dict[str, Any], side: str = "ours") -> Measurement:
    """A row from the scenario's result (see node_loss_bench_scenario.py): `side` against Ray Train."""
    o, b = r[side], r["raytrain"]

    def lost(side: dict) -> int:
        return int(side["step_at_removal"]) - (int(side["resumed_at_step"]) - 1)

    def at(side: dict, kind: str) -> float:
        return next((float(e["after_s"]) for e in side.get("timeline", []) if e["kind"] == kind), float("nan"))

    extra = {"ours_steps_lost": lost(o), "baseline_steps_lost": lost(b),
             "ours_incident_s": next((float(i["detected_after_s"]) for i in o.get("incidents", [])
                                      if i["kind"] == "node_lost"), float("nan")),
             "ours_group_restarted_s": at(o, "group_restarted"),
             "ours_warm_spares": float(o.get("restart_warm_spares") or 0),
             "ours_pool_warm_at_removal": float((o.get("pool_at_removal") or {}).get("warm", 0)),
             "baseline_function_restarted_s": at(b, "rank0_function_started"),
             "step_at_removal": float(o["step_at_removal"])}
    return Measurement(float(o["recovery_s"]), float(b["recovery_s"]), "s", BASELINE, extra=extra)


def run_scenario(workdir: Path, sides: str = "all", smoke: bool = False) -> dict[str, Any]:
    """`python -m tests.bench.node_loss_bench_scenario SIDES DIR` in a process (group) of its own,
    its Ray files under a temporary folder of their own (cluster_utils writes Ray's address file
    there, not in /tmp/ray); the process group is killed if it overruns."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONHASHSEED="0", RAY_USAGE_STATS_ENABLED="0", TRAINGUARD_WARM_WORKERS="3")
    ray_tmp = tempfile.mkdtemp(prefix="tgnl", dir="/tmp")  # short: socket paths
    env["RAY_TMPDIR"] = ray_tmp
    cmd = [sys.executable, "-m", "tests.bench.node_loss_bench_scenario", sides, str(workdir),
           *(["--smoke"] if smoke else [])]
    err_path = workdir / "scenario.stderr"
    try:
        with open(err_path, "w") as err:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                    start_new_session=True)
            try:
                stdout, _ = proc.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise RuntimeError(f"node-loss scenario ran over {TIMEOUT_S} s (stderr: {err_path})") from None
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"node-loss scenario: no result (exit {proc.returncode}); stderr: "
                           f"{err_path.read_text()[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    if "error" in result:
        raise RuntimeError(f"node-loss scenario: {result['error']}\n{result.get('traceback', '')}")
    (workdir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _check_structure() -> None:
    """Smoke: the scenario's helpers and the row built from a result, no cluster."""
    from tests.bench.node_loss_bench_scenario import after_removal, due

    recs = [{"step": s, "time": float(t), "step_seconds": 0.1} for t, s in enumerate([32, 33, 34, 31, 32])]
    assert due(33, 30) and not due(30, 30) and not due(38, 30) and after_removal(recs, 1.5)["step"] == 31
    side = {"step_at_removal": 33, "resumed_at_step": 31, "recovery_s": 1.0, "timeline": []}
    m = measurement({"ours": {**side, "incidents": []}, "raytrain": {**side, "recovery_s": 2.0}}, "ours")
    assert (m.ours, m.baseline, m.unit, m.extra["ours_steps_lost"]) == (1.0, 2.0, "s", 3)


@benchmark("recovery_node_loss", reps=3, smoke_reps=1, uses_ray=True)
def recovery_node_loss(ctx: Context) -> dict[str, Measurement]:
    """Node removal -> first step after recovery, 2 ranks + a spare node (ours: restart; Ray Train FailureConfig)."""
    if ctx.smoke:
        _check_structure()
        log("  recovery_node_loss: full size only (a four-raylet cluster does not fit the smoke budget); "
            "structure checked without a cluster, no row")
        return {}
    t0 = time.monotonic()
    r = run_scenario(ctx.sub("node-loss"))
    m = measurement(r)
    log(f"  cluster up in {r['cluster_s']:.1f}s; scenario {time.monotonic() - t0:.0f}s")
    o, b = r["ours"], r["raytrain"]
    log(f"  ours (detached: {o.get('detached')}): {m.ours:.2f}s (removed at step {o['step_at_removal']}, "
        f"resumed at {o['resumed_at_step']}; incident +{m.extra['ours_incident_s']:.2f}s, group restarted "
        f"+{m.extra['ours_group_restarted_s']:.2f}s, {o.get('restart_warm_spares')} spares taken; "
        f"pool at the removal {o.get('pool_at_removal')})")
    log(f"  Ray Train: {b['recovery_s']:.2f}s (removed at step {b['step_at_removal']}, resumed at "
        f"{b['resumed_at_step']}; training function restarted +{m.extra['baseline_function_restarted_s']:.2f}s)")
    return {"recovery_node_loss": m}
