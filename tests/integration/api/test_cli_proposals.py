"""`trainguard submit --recovery-mode`, `proposals`, `approve` and `reject` against a live test server."""
from __future__ import annotations

import json

import pytest

from tests.integration.api.conftest import VIEWER
from tests.integration.api.test_cli import _submit, cli, pipeline_file  # noqa: F401 - fixtures
from tests.integration.api.test_http_proposals import _proposal

pytestmark = pytest.mark.integration


def test_submit_with_a_recovery_mode_then_list_approve_and_reject(api, cli, pipeline_file):  # noqa: F811
    code, out, _ = cli("submit", str(pipeline_file), "--recovery-mode", "approve", "--json")
    assert code == 0 and json.loads(out)["recovery_mode"] == "approve"
    run_id = json.loads(out)["id"]
    assert api.controller.calls[-1][2]["recovery_mode"] == "approve"
    code, out, _ = cli("status", run_id, token=VIEWER)
    assert code == 0 and "recovery mode  approve" in out
    pid = _proposal(api, run_id)
    code, out, _ = cli("proposals", run_id, token=VIEWER)
    assert code == 0 and out.splitlines()[0].split()[:6] == ["ID", "STAGE", "KIND", "MODE", "ACTION", "TO_STEP"]
    assert f"{pid}  pretrain  loss_spike  approve  rollback" in out and "[[60,90]]" in out
    code, out, _ = cli("approve", run_id, str(pid), "--note", "looks right")
    assert code == 0 and out.startswith(f"proposal {pid} of {run_id} ") and "rollback to step 60" in out
    assert api.controller.calls[-1] == ("approve_proposal", (run_id, pid), {"actor": "operator", "note": "looks right"})
    code, out, _ = cli("reject", run_id, str(pid), "--json")
    assert code == 0 and json.loads(out)["id"] == pid
    assert api.controller.calls[-1] == ("reject_proposal", (run_id, pid), {"actor": "operator", "note": None})


def test_bad_proposal_ids_are_usage_errors_and_unknown_ones_one_line(api, cli, pipeline_file, capsys):  # noqa: F811
    run_id = _submit(cli, pipeline_file)
    with pytest.raises(SystemExit) as e:
        cli("approve", run_id, "abc")
    assert e.value.code == 2 and "not a proposal id" in capsys.readouterr().err
    code, _, err = cli("reject", run_id, "424242")
    assert code == 1 and err.count("\n") == 1 and "404" in err and "proposal 424242 not found" in err
