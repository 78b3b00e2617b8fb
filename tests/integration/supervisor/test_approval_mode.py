"""Approve mode end to end: real Ray workers, the real REST API, a fake Grafana (no Grafana
server can be installed here; tests/integration/deploy/fake_grafana.py checks every request
against Grafana's documented annotation API). A spike becomes a proposal and the run is held
with no rollback; approving it over REST rolls back to exactly the proposed checkpoint with the
proposed skip list and LR."""
from __future__ import annotations


import httpx
import pytest

from tests.conftest import free_port
from tests.integration.deploy.fake_grafana import FakeGrafanaServer
from tests.integration.supervisor.harness import (api_server, incidents, metrics_log, running_controller, tiny_pipeline,
                                                  wait_state)

pytestmark = pytest.mark.integration
OP = {"Authorization": "Bearer dev-operator-token"}


def test_approve_mode_spike_is_proposed_held_and_rolled_back_exactly_once_approved(ray_session, tmp_state):
    # step_delay: the hold reaches the workers while they train, so the rollback is the in-process
    # one (a stage that finishes first is held and restarted: tests/unit/service/supervisor/test_driver.py)
    spec = tiny_pipeline(steps=100, faults=[{"kind": "loss_spike", "at_step": 60, "duration": 6}],
                         extra={"step_delay": 0.03})
    port = free_port()
    with FakeGrafanaServer() as grafana, \
            running_controller(tmp_state, port=port, grafana_url=grafana.url, grafana_token=grafana.token) as ctl, \
            api_server(ctl, port):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", headers=OP, timeout=30) as client:
            r = client.post("/runs", json={"spec": spec.model_dump(mode="json"), "recovery_mode": "approve"})
            assert r.status_code == 201 and r.json()["recovery_mode"] == "approve", r.text
            run_id = r.json()["id"]
            assert wait_state(ctl, run_id, ("needs_attention", "completed", "failed")) == "needs_attention"
            (prop,) = client.get(f"/runs/{run_id}/proposals").json()["data"]
            assert (prop["state"], prop["action"], prop["kind"]) == ("proposed", "rollback", "loss_spike")
            assert prop["checkpoint_step"] < 60 and prop["skip"] and prop["lr_target"] == 0.5
            # held, nothing recovered: no incident acted on, the workers never went back
            assert not [i for i in incidents(ctl, run_id) if i.action]
            log = metrics_log(tmp_state, run_id, "pretrain")
            assert all(b["step"] > a["step"] for a, b in zip(log, log[1:]))

            r = client.post(f"/runs/{run_id}/proposals/{prop['id']}/approve", json={"note": "go"})
            assert r.status_code == 202 and r.json()["state"] == "approved", r.text
            assert wait_state(ctl, run_id) == "completed"
            events = client.get(f"/runs/{run_id}/events", params={"limit": 1000}).json()["data"]
        ctl.annotator.flush()
    (inc,) = [i for i in incidents(ctl, run_id) if i.action]
    assert (inc.id, inc.action, inc.outcome) == (prop["incident_id"], "rollback", "resolved")
    assert (inc.rollback_to_step, inc.skip, inc.lr_multiplier) == (prop["checkpoint_step"], prop["skip"], 0.5)
    log = metrics_log(tmp_state, run_id, "pretrain")
    back = next(i for i in range(1, len(log)) if log[i]["step"] <= log[i - 1]["step"])
    assert log[back]["step"] == prop["checkpoint_step"] + 1, "resumed right after the proposed checkpoint"
    skip = [tuple(r) for r in prop["skip"]]
    assert not [r["batch_index"] for r in log[back:] if any(a <= r["batch_index"] < e for a, e in skip)]
    assert ("proposal_approved", "operator") in [(e["kind"], e["actor"]) for e in events]
    states = [t for a in grafana.annotations for t in a["tags"] if t.startswith("state:")]
    assert states == ["state:proposed", "state:approved"], grafana.annotations
    assert all({"trainguard", "proposal", f"run:{run_id}"} <= set(a["tags"]) for a in grafana.annotations)
