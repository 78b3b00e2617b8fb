"""Guard your own code, end to end: a `kind: custom` stage from a file outside the packages under
`trainguard serve` + `trainguard submit`, and the loop-API example under the supervisor. An
injected loss spike is rolled back with its batches skipped and the LR lowered, a killed rank is
restarted, pause/resume/anneal act — asserted on the workers' exported metrics and their logs of
global sample indices and LR. Bad entrypoints are refused at submit with 422 naming the field,
and the supervisor's process never imports user code."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, wait_for
from tests.integration.supervisor.harness import (api_server, reap_detached_actors, ready, running_controller,
                                                  serve_process)
from trainguard.workers.runtime.harness import schedule_lr

pytestmark = pytest.mark.integration
OP = {"Authorization": "Bearer dev-operator-token"}
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _pipeline(example: str, *, steps: int, step_delay: float, **options: Any) -> dict[str, Any]:
    """The example's pipeline with the faults this test needs: a spike, then a killed rank."""
    spec = yaml.safe_load((EXAMPLES / example / "pipeline.yaml").read_text())
    st = spec["stages"][0]
    st["options"].update(options)
    st.update(steps=steps, step_delay=step_delay, eval_every=100, batch_size=32,
              faults=[{"kind": "loss_spike", "at_step": 60, "duration": 3},
                      {"kind": "worker_crash", "at_step": 150, "rank": 1}])
    spec["checkpoint"] = {"every": 10, "keep_last": 40}  # the rollback target outlives a slow detection
    return spec


def _gauges(client: httpx.Client, run_id: str) -> dict[int, dict[str, float]]:
    """Each rank's step, LR and paused gauges, scraped from its exporter (found through /sd)."""
    out: dict[int, dict[str, float]] = {}
    for t in client.get("/api/v1/sd").json():
        if t["labels"].get("run") != run_id:
            continue
        try:
            text = httpx.get(f"http://{t['targets'][0]}/metrics", timeout=2).text
        except httpx.HTTPError:
            continue
        out[int(t["labels"]["rank"])] = {
            s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name in ("trainguard_step", "trainguard_learning_rate", "trainguard_worker_paused")}
    return out


def _exercise(client: httpx.Client, run_id: str, state_dir: Path, stage: str, steps: int) -> None:
    """Spike and crash recovered (by the faults), pause/resume/anneal through the API, then the
    run completes; every claim checked on what the workers exported and logged."""
    incs = lambda: client.get(f"/api/v1/runs/{run_id}/incidents").json()["data"]  # noqa: E731
    wait_for(lambda: {"loss_spike", "worker_lost"} <= {i["kind"] for i in incs() if i["outcome"] == "resolved"},
             150, what="the spike rolled back and the killed rank restarted")
    step = lambda: min((g.get("trainguard_step", -1) for g in _gauges(client, run_id).values()), default=-1)  # noqa: E731

    # pause: every rank reports paused and the step holds
    assert client.post(f"/api/v1/runs/{run_id}/pause").status_code == 202
    wait_for(lambda: (g := _gauges(client, run_id)) and len(g) == 2
             and all(v["trainguard_worker_paused"] == 1 for v in g.values()), 20, what="both ranks paused")
    held = step()
    time.sleep(1.0)
    assert step() == held, "the step advanced while paused"
    assert client.post(f"/api/v1/runs/{run_id}/resume").status_code == 202
    wait_for(lambda: step() > held, 20, what="steps after resume")

    # anneal: the exported LR reaches final_lr
    r = client.post(f"/api/v1/runs/{run_id}/anneal", json={"steps": 15, "final_lr": 1e-5, "schedule": "linear"})
    assert r.status_code == 202, r.text
    wait_for(lambda: all(v["trainguard_learning_rate"] == pytest.approx(1e-5, rel=1e-6)
                         for v in _gauges(client, run_id).values()), 60, what="the LR annealed to 1e-5")
    wait_for(lambda: client.get(f"/api/v1/runs/{run_id}").json()["state"] == "completed", 120, what="run completes")

    spike = next(i for i in incs() if i["kind"] == "loss_spike")
    assert spike["action"] == "rollback" and spike["skip"] and spike["lr_multiplier"] < 1.0
    run_dir = state_dir / "runs" / run_id / stage
    logs = {r: [json.loads(line) for line in (run_dir / f"metrics-rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)}
    for rank, recs in logs.items():
        trained = [r["batch_index"] for r in recs]
        for a, b in spike["skip"]:
            for bi in range(a, b):
                assert trained.count(bi) <= 1, f"rank {rank}: skipped batch {bi} trained again"
        assert 60 in trained and trained.count(60) == 1, "the corrupted batch was trained once, then skipped"
        # each record names the global samples the rank trained: its half of the batch of 32
        assert all(r["samples"] == [r["batch_index"] * 32 + 16 * rank, r["batch_index"] * 32 + 16 * (rank + 1)]
                   for r in recs)
        assert recs[-1]["step"] == steps
    # the first step after the rollback ran at the lowered LR
    recs = logs[0]
    back = next(i for i in range(1, len(recs)) if recs[i]["step"] <= recs[i - 1]["step"])
    first = recs[back]
    assert first["step"] - 1 == spike["rollback_to_step"]
    expected = schedule_lr(first["step"] - 1, base=3e-3, total=steps, warmup=10, min_ratio=0.1) * spike["lr_multiplier"]
    assert first["lr"] == pytest.approx(expected, rel=1e-9)
    assert first["loss"] < 3 * min(r["loss"] for r in recs[:back] if r["batch_index"] < 60)


def test_a_custom_stage_from_its_own_file_is_guarded_under_serve_and_submit(ray_session, tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "probe_stage.py").write_text(
        "import os\nwith open(os.path.join(os.path.dirname(__file__), 'pids'), 'a') as f:\n"
        "    f.write(f'{os.getpid()}\\n')\nNotAStage = 3\n")
    state, port, log = tmp_path / "state", free_port(), tmp_path / "supervisor.log"
    url = f"http://127.0.0.1:{port}"
    env = {"TRAINGUARD_STATE_DIR": str(state), "TRAINGUARD_PORT": str(port),
           "TRAINGUARD_ENVIRONMENT": "development", "TRAINGUARD_WATCH_INTERVAL": "0.25",
           "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "TRAINGUARD_USER_CODE_MODULES": "regression_stage,probe_stage,absent_mod",
           "TRAINGUARD_USER_CODE_PATHS": f"{EXAMPLES / 'custom_stage'},{probe}"}
    spec = _pipeline("custom_stage", steps=400, step_delay=0.02)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    proc = serve_process(env, log)
    client = httpx.Client(base_url=url, headers=OP, timeout=60)
    try:
        wait_for(lambda: ready(client), 90, what=f"supervisor ready (log: {log})")
        for entry, kind, says in [("os.path:join", "custom", "not under an allowed prefix"),
                                  ("absent_mod.x:Stage", "custom", "was not found"),
                                  ("probe_stage:NotAStage", "custom", "not a stage class"),
                                  ("regression_stage:make_samples", "custom", "not a stage class"),
                                  ("regression_stage:RegressionStage", "loop", "not a function")]:
            bad = {**spec, "stages": [{**spec["stages"][0], "entrypoint": entry, "kind": kind}]}
            r = client.post("/api/v1/runs", json={"spec": bad})
            assert r.status_code == 422, (entry, r.text)
            assert "stages.0.entrypoint" in r.text and says in r.text, r.text
        assert client.get("/api/v1/runs").json()["count"] == 0, "a refused spec started nothing"
        pids = {int(p) for p in (probe / "pids").read_text().split()}
        assert pids and proc.pid not in pids, "the probe was imported, never by the supervisor's process"

        out = subprocess.run([sys.executable, "-m", "trainguard.service.cli", "submit", str(tmp_path / "pipeline.yaml"),
                              "--url", url, "--token", "dev-operator-token", "--json"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        run_id = json.loads(out.stdout)["id"]
        _exercise(client, run_id, state, "fit", 400)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        client.close()
        reap_detached_actors()


def test_the_loop_api_example_is_guarded_under_the_supervisor(ray_session, tmp_state):
    port = free_port()
    with running_controller(tmp_state, port=port, user_code_modules=["charlm"],
                            user_code_paths=[str(EXAMPLES / "own_loop")]) as ctl, api_server(ctl, port), \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=OP, timeout=60) as client:
        r = client.post("/api/v1/runs", json={"spec": _pipeline("own_loop", steps=400, step_delay=0.01, block=32)})
        assert r.status_code == 201, r.text
        _exercise(client, r.json()["id"], ctl.state_dir, "charlm", 400)
