"""The supervisor is SIGKILLed while a run is active and started again on the same database:
it picks the run up, and no incident is lost or handled twice."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_for
from tests.integration.supervisor.harness import ready, serve_process, tiny_pipeline

pytestmark = pytest.mark.integration
OP = {"Authorization": "Bearer dev-operator-token"}


def _serve(state_dir: Path, port: int, ray_address: str, log: Path) -> subprocess.Popen:
    return serve_process({"TRAINGUARD_STATE_DIR": str(state_dir), "TRAINGUARD_PORT": str(port),
                          "TRAINGUARD_ENVIRONMENT": "development", "TRAINGUARD_WATCH_INTERVAL": "0.25",
                          "TRAINGUARD_HANG_TIMEOUT": "5", "RAY_ADDRESS": ray_address}, log)


def test_sigkilled_supervisor_picks_runs_up_without_losing_or_repeating_incidents(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    state, port, log = tmp_path / "state", free_port(), tmp_path / "supervisor.log"
    # keep_last: the rollback target must outlive a slow detection on a loaded machine (retention
    # racing detection is not what this test is about)
    spec = tiny_pipeline(steps=250, every=10, keep_last=30, extra={"step_delay": 0.02},
                         faults=[{"kind": "loss_spike", "at_step": 40, "duration": 5}])
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=OP, timeout=30)
    proc = _serve(state, port, address, log)
    try:
        wait_for(lambda: ready(client), 90, what=f"supervisor ready (log: {log})")
        r = client.post("/api/v1/runs", json={"spec": spec.model_dump(mode="json")})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        incs = lambda: client.get(f"/api/v1/runs/{run_id}/incidents").json()["data"]  # noqa: E731
        wait_for(lambda: any(i["kind"] == "loss_spike" and i["outcome"] == "resolved" for i in incs()), 120,
                 what="the spike recovered")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

        proc = _serve(state, port, address, log)
        wait_for(lambda: ready(client), 90, what=f"supervisor ready again (log: {log})")
        wait_for(lambda: client.get(f"/api/v1/runs/{run_id}").json()["state"] == "completed", 180,
                 what="the adopted run completes")
        final = incs()
        events = client.get(f"/api/v1/runs/{run_id}/events").json()["data"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        client.close()
    spikes = [i for i in final if i["kind"] == "loss_spike"]
    assert len(spikes) == 1, f"the spike was handled once: {final}"
    assert all(i["outcome"] in ("resolved", "ignored") for i in final), final
    assert any(e["kind"] == "adopted" for e in events)
    restarted = [e for e in events if e["kind"] == "stage_started"]
    assert len(restarted) == 2 and restarted[1]["detail"]["resume_from"], "resumed from a checkpoint"
    resumed_step = int(restarted[1]["detail"]["resume_from"].rstrip("/").rsplit("step-", 1)[1])
    assert resumed_step >= spikes[0]["rollback_to_step"], "resumed from the rollback's checkpoint or a newer one"
