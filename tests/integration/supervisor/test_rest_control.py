"""Pause / resume / anneal / rollback / stop through the REST API, end to end against real Ray
workers; each asserted on the workers' own exported metrics."""
from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, wait_for
from tests.integration.supervisor.harness import (api_server, assert_nothing_survives, running_controller, tiny_pipeline,
                                                  wait_state)

pytestmark = pytest.mark.integration
OP = {"Authorization": "Bearer dev-operator-token"}


def worker_gauges(ctl, run_id: str, rank: int = 0) -> dict[str, float]:
    d = ctl.drivers[run_id]
    t = next(t for t in d.active.targets if t.rank == rank)
    text = httpx.get(f"http://{t.address}/metrics", timeout=2).text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name in ("trainguard_step", "trainguard_learning_rate", "trainguard_worker_paused")}


def steady(read, seconds: float) -> float:
    """Read a value repeatedly for `seconds` and return it, failing if it changes (an observation window)."""
    first = read()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert read() == first, "value changed while it should hold"
        time.sleep(0.1)
    return first


@pytest.fixture
def api(ray_session, tmp_state):
    port = free_port()
    with running_controller(tmp_state, port=port) as ctl, api_server(ctl, port), \
            httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", headers=OP, timeout=30) as client:
        yield ctl, client


def test_pause_resume_anneal_rollback_stop_act_on_the_workers(api, groups):
    ctl, client = api
    # keep every checkpoint: the rollback below names the oldest one, which retention would delete
    spec = tiny_pipeline(steps=5000, every=10, keep_last=1000, extra={"step_delay": 0.02})
    r = client.post("/runs", json={"spec": spec.model_dump(mode="json")})
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    step = lambda: worker_gauges(ctl, run_id)["trainguard_step"]  # noqa: E731
    wait_for(lambda: run_id in ctl.drivers and ctl.drivers[run_id].active and ctl.drivers[run_id].active.targets
             and step() >= 25, 60, what="run reaches step 25")

    # the live step, loss and last-step time of the running stage (not step 0 until it ends)
    live = wait_for(lambda: (st := client.get(f"/runs/{run_id}").json()["stages"][0])["step"] >= 20 and st,
                    10, what="GET /runs/{id} shows the running stage's step")
    assert live["state"] == "running" and live["last_loss"] > 0 and live["last_step_at"] is not None

    # pause: the step stops advancing
    assert client.post(f"/runs/{run_id}/pause").status_code == 202
    wait_for(lambda: worker_gauges(ctl, run_id)["trainguard_worker_paused"] == 1, 10, what="paused gauge")
    held = steady(step, 1.0)
    assert client.get(f"/runs/{run_id}").json()["state"] == "paused"

    # resume: continues from the same step
    assert client.post(f"/runs/{run_id}/resume").status_code == 202
    wait_for(lambda: step() > held, 10, what="step advances after resume")

    # anneal: the LR follows the requested decay to final_lr
    r = client.post(f"/runs/{run_id}/anneal", json={"steps": 20, "final_lr": 1e-5, "schedule": "linear"})
    assert r.status_code == 202, r.text
    s0 = step()
    wait_for(lambda: step() >= s0 + 25, 30, what="anneal steps pass")
    assert worker_gauges(ctl, run_id)["trainguard_learning_rate"] == pytest.approx(1e-5, rel=1e-3)

    # rollback to a named checkpoint: the step goes back
    wait_for(lambda: client.get(f"/runs/{run_id}/checkpoints").json()["count"] >= 2, 30, what="checkpoints")
    ckpts = client.get(f"/runs/{run_id}/checkpoints").json()["data"]
    target = min(ckpts, key=lambda c: c["step"])
    before = step()
    r = client.post(f"/runs/{run_id}/rollback", json={"checkpoint_id": target["id"]})
    assert r.status_code == 202, r.text
    assert r.json()["rollback_to_step"] == target["step"]
    wait_for(lambda: step() < before, 20, what="step goes back after rollback")
    events = client.get(f"/runs/{run_id}/events").json()["data"]
    assert any(e["actor"] == "operator" and e["kind"] == "recovery_decision" for e in events)

    # stop: the run ends in state stopped, and nothing of it survives
    assert client.post(f"/runs/{run_id}/stop").status_code == 202
    assert wait_state(ctl, run_id, ("stopped",), timeout=30) == "stopped"
    assert_nothing_survives(ctl, run_id, groups[run_id])
