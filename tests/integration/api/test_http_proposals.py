"""Approval modes over real HTTP (a recording controller): the mode at submit, the proposal
list, approve / reject reaching the controller with the actor, and every bad request refused
at the edge with the store unchanged."""
from __future__ import annotations

import pytest
from sqlmodel import Session

from trainguard.service.db import crud
from trainguard.service.errors import Conflict
from tests.integration.api.conftest import OPERATOR, VIEWER
from tests.integration.api.test_http import SPEC, _rejected, _submit

pytestmark = pytest.mark.integration


def _proposal(api, run_id: str, **fields) -> int:
    with Session(api.engine) as s:
        prop = crud.create_proposal(
            s, run_id=run_id, stage_name="pretrain", incident_id=None, mode="approve", kind="loss_spike",
            action="rollback", reason="loss_spike at step 70: roll back to checkpoint 60", checkpoint_step=60,
            checkpoint_ref="/ck/step-00000060", skip=[[60, 90]], lr_multiplier=0.5, lr_target=0.5, attempt=1,
            source="spike", evidence={"score": 9.0}, at_step=75, state="proposed", **fields)
        return int(prop.id)


def test_submit_stores_the_recovery_mode_and_passes_it_only_when_asked(api):
    with api.client(OPERATOR) as c:
        r = c.post("/api/v1/runs", json={"spec": SPEC, "recovery_mode": "approve"})
        assert r.status_code == 201, r.text
        assert r.json()["recovery_mode"] == "approve"
    assert api.controller.calls[-1][2] == {"actor": "operator", "recovery_mode": "approve"}
    plain = _submit(api)
    assert plain["recovery_mode"] == "auto" and api.controller.calls[-1][2] == {"actor": "operator"}
    _rejected(api, "POST", "/api/v1/runs", json={"spec": SPEC, "recovery_mode": "yolo"}, status=422,
              match="recovery_mode")


def test_proposals_are_listed_and_read(api):
    run = _submit(api)
    pid = _proposal(api, run["id"])
    _proposal(api, run["id"])
    with api.client(VIEWER) as c:
        page = c.get(f"/api/v1/runs/{run['id']}/proposals", params={"limit": 1}).json()
        assert page["count"] == 2 and [p["id"] for p in page["data"]] == [pid]
        assert page["data"][0]["skip"] == [[60, 90]] and page["data"][0]["state"] == "proposed"
        assert c.get(f"/api/v1/runs/{run['id']}/proposals", params={"state": "approved"}).json()["count"] == 0
        assert c.get(f"/api/v1/runs/{run['id']}/proposals", params={"state": "nope"}).status_code == 422


def test_approve_and_reject_reach_the_controller_with_actor_and_note(api):
    run = _submit(api)
    pid = _proposal(api, run["id"])
    with api.client(OPERATOR) as c:
        r = c.post(f"/api/v1/runs/{run['id']}/proposals/{pid}/approve", json={"note": "looks right"})
        assert r.status_code == 202, r.text
        assert r.json()["id"] == pid
        r = c.post(f"/api/v1/runs/{run['id']}/proposals/{pid}/reject")
        assert r.status_code == 202, r.text
    assert api.controller.calls[-2:] == [
        ("approve_proposal", (run["id"], pid), {"actor": "operator", "note": "looks right"}),
        ("reject_proposal", (run["id"], pid), {"actor": "operator", "note": None}),
    ]


def test_bad_proposal_requests_are_refused_at_the_edge(api):
    run, other = _submit(api), _submit(api)
    pid = _proposal(api, run["id"])
    theirs = _proposal(api, other["id"])
    base = f"/api/v1/runs/{run['id']}/proposals"
    _rejected(api, "POST", f"{base}/{theirs}/approve", status=404, match=f"proposal {theirs} not found")
    _rejected(api, "POST", f"{base}/999999/reject", status=404, match="not found")
    for bad in ("0", "abc", "-1", "1.5", str(2**40)):
        _rejected(api, "POST", f"{base}/{bad}/approve", status=422, match="proposal_id")
    _rejected(api, "POST", f"{base}/{pid}/approve", json={"note": "x" * 501}, status=422, match="note")
    _rejected(api, "POST", f"{base}/{pid}/approve", json={"why": "x"}, status=422, match="why")
    _rejected(api, "POST", f"{base}/{pid}/approve", token=VIEWER, status=403, match="operator")
    _rejected(api, "POST", "/api/v1/runs/run-0123456789ab/proposals/1/approve", status=404, match="not found")
    _rejected(api, "POST", f"{base}/{pid}/maybe", status=422, match="decision")


def test_a_refused_approval_is_409_with_the_controllers_reason(api):
    run = _submit(api)
    pid = _proposal(api, run["id"])
    api.controller.fail_with = Conflict(f"proposal {pid} can no longer be carried out: its checkpoint is gone")
    with api.client(OPERATOR) as c:
        r = c.post(f"/api/v1/runs/{run['id']}/proposals/{pid}/approve")
    assert r.status_code == 409 and "checkpoint is gone" in r.json()["detail"]
