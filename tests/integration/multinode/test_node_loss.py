"""Issue 11, acceptance: a node removed while ranks train on it -> a node-loss incident naming
it -> training continues on the remaining nodes from the newest good checkpoint.

The scenario (node_loss_scenario.py) runs a real multi-node Ray cluster (a head and two
worker nodes, each its own raylet; ray.cluster_utils) and the real supervisor connected
through the cluster's address, in a process of its own: the test session's Ray is one
local instance, and a process is connected to one Ray at a time.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
TIMEOUT_S = 240


def run_scenario(state_dir: Path, module: str = "tests.integration.multinode.node_loss_scenario") -> dict:
    """Run `module`'s scenario (`python -m module STATE_DIR`) in a process of its own; its result."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # one warm spare per worker node (a spare costs ~20 s of CPU to warm up, on two shared cores):
    # after the loss the restarted group has one warm spare and one new actor in its bundle
    env.update(PYTHONHASHSEED="0", RAY_USAGE_STATS_ENABLED="0", TRAINGUARD_WARM_WORKERS="2")
    # Ray's files of this cluster (sessions, sockets, and the address file cluster_utils writes,
    # which a plain ray.init() elsewhere would join) under a folder of its own; short: socket paths
    ray_tmp = tempfile.mkdtemp(prefix="tgmn", dir="/tmp")
    env["RAY_TMPDIR"] = ray_tmp
    try:
        proc = subprocess.run([sys.executable, "-m", module, str(state_dir)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no result (exit {proc.returncode})\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in result, f"{result['error']}\n{result.get('traceback')}\nstderr:\n{proc.stderr[-8000:]}"
    return result


def test_a_lost_node_restarts_the_group_on_the_remaining_nodes_from_the_newest_good_checkpoint(tmp_path):
    r = run_scenario(tmp_path / "state")
    print(json.dumps({**{k: v for k, v in r.items() if k not in ("incidents", "events")},
                      "recovery_seconds": [i["recovery_seconds"] for i in r["incidents"]]}, indent=1))
    removed, survivors = r["removed_node"], set(r["worker_nodes"]) - {r["removed_node"]}
    assert r["connected_to"]  # the supervisor joined the cluster through its address
    assert set(r["first_nodes"]) == set(r["worker_nodes"])  # SPREAD: one rank per worker node, none on the head
    # one incident: the node's loss, naming it; restart from the newest good checkpoint before the loss
    # (a straggler note may come too: six processes share two cores here; it changes nothing)
    acted = [i for i in r["incidents"] if i["action"] != "notify"]
    assert [i["kind"] for i in acted] == ["node_lost"], r["incidents"]
    inc = acted[0]
    assert inc["evidence"]["nodes"] == [removed] and 1 in inc["evidence"]["ranks"]
    assert inc["action"] == "restart" and inc["outcome"] == "resolved"
    assert inc["rollback_to_step"] == max(r["checkpoints_at_incident"])
    # no older one: the newest the supervisor had when the node went (the supervisor's step for the
    # stage comes from scrapes, which lag the reports: it is no upper bound; the resume step below is)
    assert r["newest_checkpoint_at_removal"] <= inc["rollback_to_step"]
    assert inc["recovery_seconds"] is not None
    # the restarted group trains on the surviving node only, from that checkpoint, to the end
    assert set(r["restart_nodes"]) <= survivors and removed not in r["restart_nodes"]
    assert r["first_warm_spares"] == 2 and r["restart_warm_spares"] == 1  # the spares on the bundles' nodes
    assert r["first_steps_after_restart"]["resumed_at_step"] == inc["rollback_to_step"] + 1
    assert r["first_steps_after_restart"]["final_step"] == 40
    assert r["run_state"] == "completed"
    assert removed not in r["alive_nodes_at_end"]
