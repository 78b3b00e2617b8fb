"""`trainguard demo --json`: the whole pipeline with the default fault schedule, every fault
matched by an incident, and the summary carrying every field the issue lists."""
from __future__ import annotations

import json

import pytest

from trainguard.service import demo

pytestmark = pytest.mark.integration

STAGE_FIELDS = {"kind", "state", "steps", "first_loss", "final_loss"}
FAULT_FIELDS = {"kind", "stage", "step"}
INCIDENT_FIELDS = {"kind", "stage", "onset_step", "detected_at_step", "action", "rollback_to_step",
                   "recovery_seconds"}


def test_demo_json_summary_matches_every_injected_fault(ray_session, tmp_path, capsys):
    rc = demo.main(["--json", "--quiet", "--state-dir", str(tmp_path / "demo")])
    lines = capsys.readouterr().out.splitlines()
    summary = json.loads(lines[0])  # stdout starts with the JSON object: nothing the run printed comes before
    assert rc == 0, summary
    assert {"run_id", "state", "stages", "faults_injected", "incidents", "goodput_ratio"} <= set(summary)
    assert summary["state"] == "completed"
    kinds = [s["kind"] for s in summary["stages"]]
    assert kinds == ["pretrain", "anneal", "sft", "reward_model", "ppo", "dpo"]
    for st in summary["stages"]:
        assert STAGE_FIELDS <= set(st) and st["state"] == "completed"
        assert st["first_loss"] is not None and st["final_loss"] is not None
    # pretraining really trained: byte-level loss well below its uniform start (ln 260 = 5.56)
    pre = summary["stages"][0]
    assert pre["final_loss"] < pre["first_loss"] - 1.0
    faults = summary["faults_injected"]
    assert {f["kind"] for f in faults} >= {"loss_spike", "nan", "worker_crash", "hang"}
    assert len({f["stage"] for f in faults}) >= 3, "faults in different stages"
    for f in faults:
        assert FAULT_FIELDS <= set(f)
        assert f["matched_incident"] is not None, f"fault {f} has no incident"
    by_id = {i["id"]: i for i in summary["incidents"]}
    for f in faults:
        inc = by_id[f["matched_incident"]]
        assert INCIDENT_FIELDS <= set(inc)
        assert inc["stage"] == f["stage"]
        assert inc["action"] in ("rollback", "restart")
        assert inc["recovery_seconds"] is not None and inc["recovery_seconds"] >= 0
        if inc["action"] == "rollback":
            assert inc["rollback_to_step"] is not None and inc["rollback_to_step"] < inc["onset_step"]
        if f["kind"] in ("loss_spike", "nan"):
            assert abs(inc["onset_step"] - (f["step"] + 1)) <= 3  # step counts steps done (1-based)
    assert 0 < summary["goodput_ratio"] <= 1
