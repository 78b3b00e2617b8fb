"""The supervisor is SIGKILLed while a run is active and started again on the same database:
it picks the run up, and no incident is lost or handled twice. On a cluster ($RAY_ADDRESS) the
rank actors are detached: the restarted supervisor re-attaches to the same processes, which
trained on meanwhile; with detached workers off it restarts the stage from a checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_for
from tests.integration.supervisor.harness import reap_detached_actors, ready, serve_process, tiny_pipeline

pytestmark = pytest.mark.integration
OP = {"Authorization": "Bearer dev-operator-token"}


def _serve(state_dir: Path, port: int, ray_address: str, log: Path, detached: str = "auto") -> subprocess.Popen:
    return serve_process({"TRAINGUARD_STATE_DIR": str(state_dir), "TRAINGUARD_PORT": str(port),
                          "TRAINGUARD_ENVIRONMENT": "development", "TRAINGUARD_WATCH_INTERVAL": "0.25",
                          "TRAINGUARD_HANG_TIMEOUT": "5", "RAY_ADDRESS": ray_address,
                          "TRAINGUARD_DETACHED_WORKERS": detached}, log)


def _ranks(run_id: str) -> dict[int, dict]:
    """The run's detached rank actors (group-named, or warm spares a group took), as each
    describes itself (TrainWorker.identity, and its step)."""
    import ray

    from trainguard.workers.group import DETACHED_NAMESPACE

    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] != DETACHED_NAMESPACE:
            continue
        try:
            h = ray.get_actor(a["name"], namespace=DETACHED_NAMESPACE)
            ident = ray.get(h.identity.remote(), timeout=10)
            if ident["run_id"] == run_id:
                out[int(ident["rank"])] = {**ident, "step": ray.get(h.status.remote(), timeout=10)["step"]}
        except Exception:  # noqa: BLE001 - dying
            continue
    return out


def test_a_sigkilled_supervisor_reattaches_to_the_live_detached_workers(ray_session, tmp_path):
    from sqlmodel import Session

    from trainguard.service.db import crud, make_engine

    address = ray_session.get_runtime_context().gcs_address
    state, port, log = tmp_path / "state", free_port(), tmp_path / "supervisor.log"
    # long enough never to finish on its own: the test stops it once the new supervisor watches it
    spec = tiny_pipeline(steps=5000, every=10, keep_last=30, extra={"step_delay": 0.02},
                         faults=[{"kind": "loss_spike", "at_step": 40, "duration": 5}])
    other = tiny_pipeline(name="other", steps=5000, every=50, extra={"step_delay": 0.05})
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=OP, timeout=30)
    proc = _serve(state, port, address, log)
    try:
        wait_for(lambda: ready(client), 90, what=f"supervisor ready (log: {log})")
        run_id, stopped_id = (client.post("/api/v1/runs", json={"spec": s.model_dump(mode="json")}).json()["id"]
                              for s in (spec, other))
        incs = lambda: client.get(f"/api/v1/runs/{run_id}/incidents").json()["data"]  # noqa: E731
        wait_for(lambda: any(i["kind"] == "loss_spike" and i["outcome"] == "resolved" for i in incs()), 120,
                 what="the spike recovered")
        wait_for(lambda: len(_ranks(stopped_id)) == 1, 60, what="the other run's rank")
        before, n_incidents = _ranks(run_id), len(incs())
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

        # no supervisor: the rank trains on; the other run is stopped in the store meanwhile
        wait_for(lambda: _ranks(run_id)[0]["step"] >= before[0]["step"] + 20, 60, what="training without a supervisor")
        engine = make_engine(f"sqlite:///{state / 'trainguard.db'}")
        with Session(engine) as s:
            crud.set_run_state(s, run=crud.get_run(s, run_id=stopped_id), state="stopped", actor="test",
                               reason="stopped while no supervisor ran")
        engine.dispose()
        down = _ranks(run_id)

        proc = _serve(state, port, address, log)
        wait_for(lambda: ready(client), 90, what=f"supervisor ready again (log: {log})")
        wait_for(lambda: not _ranks(stopped_id), 30, what="the stopped run's actor reaped")
        after = _ranks(run_id)
        live = lambda: client.get(f"/api/v1/runs/{run_id}").json()["stages"][0]["step"]  # noqa: E731
        wait_for(lambda: live() > after[0]["step"], 60, what="the new supervisor watching the live steps")
        assert client.post(f"/api/v1/runs/{run_id}/stop").status_code == 202
        wait_for(lambda: client.get(f"/api/v1/runs/{run_id}").json()["state"] == "stopped", 60,
                 what="the re-attached run stops")
        events = lambda: client.get(f"/api/v1/runs/{run_id}/events").json()["data"]  # noqa: E731
        wait_for(lambda: any(e["kind"] == "stage_stopped" for e in events()), 60, what="the stage ended")
        wait_for(lambda: not _ranks(run_id), 30, what="the stopped run's actors gone")
        final = incs()
        events = events()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        client.close()
        reap_detached_actors()
    assert after and {r: (i["pid"], i["actor_id"]) for r, i in after.items()} == \
        {r: (i["pid"], i["actor_id"]) for r, i in before.items()}, "the same actors and processes"
    assert after[0]["step"] >= down[0]["step"] > before[0]["step"], "no step lost: it trained on while no one watched"
    assert len(final) == n_incidents, f"no incident added by the restart: {final}"
    assert sum(1 for e in events if e["kind"] == "stage_started") == 1, "the stage was never restarted"
    assert any(e["kind"] == "reattached" for e in events)
    stopped = [e for e in events if e["kind"] == "stage_stopped"]
    assert len(stopped) == 1 and stopped[0]["result"] == "ok" and stopped[0]["detail"]["workers"] == "stopped", \
        f"the new supervisor's STOP reached the re-attached workers (numbered after the old one's): {stopped}"
    steps = [json.loads(line)["step"] for line in
             (state / "runs" / run_id / "pretrain" / "metrics-rank0.jsonl").read_text().splitlines()]
    at_kill = len(steps) - 1 - steps[::-1].index(before[0]["step"])  # after the spike's rollback
    assert all(b == a + 1 for a, b in zip(steps[at_kill:], steps[at_kill + 1:])), \
        "no checkpoint loaded after the kill: every step follows the one before"
    assert steps[-1] > after[0]["step"], "it trained on under the new supervisor"


def test_with_detached_workers_off_a_sigkilled_supervisor_restarts_the_stage_from_a_checkpoint(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    state, port, log = tmp_path / "state", free_port(), tmp_path / "supervisor.log"
    # keep_last: the rollback target must outlive a slow detection on a loaded machine (retention
    # racing detection is not what this test is about)
    spec = tiny_pipeline(steps=250, every=10, keep_last=30, extra={"step_delay": 0.02},
                         faults=[{"kind": "loss_spike", "at_step": 40, "duration": 5}])
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=OP, timeout=30)
    proc = _serve(state, port, address, log, detached="off")
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

        proc = _serve(state, port, address, log, detached="off")
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
        reap_detached_actors()
    spikes = [i for i in final if i["kind"] == "loss_spike"]
    assert len(spikes) == 1, f"the spike was handled once: {final}"
    assert all(i["outcome"] in ("resolved", "ignored") for i in final), final
    assert any(e["kind"] == "adopted" for e in events)
    restarted = [e for e in events if e["kind"] == "stage_started"]
    assert len(restarted) == 2 and restarted[1]["detail"]["resume_from"], "resumed from a checkpoint"
    resumed_step = int(restarted[1]["detail"]["resume_from"].rstrip("/").rsplit("step-", 1)[1])
    assert resumed_step >= spikes[0]["rollback_to_step"], "resumed from the rollback's checkpoint or a newer one"
