"""`trainguard` CLI against a live test server: tables, --json, one-line errors, --wait."""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import pytest
from sqlmodel import Session

from trainguard.service.cli import main
from trainguard.service.db import crud
from tests.conftest import free_port
from tests.integration.api.conftest import OPERATOR, VIEWER

pytestmark = pytest.mark.integration

PIPELINE = """\
name: cli-run
stages:
  - name: pretrain
    kind: pretrain
    steps: 50
  - name: anneal
    kind: anneal
    steps: 10
"""


@pytest.fixture
def cli(api, monkeypatch, capsys):
    for var in ("TRAINGUARD_URL", "TRAINGUARD_TOKEN"):
        monkeypatch.delenv(var, raising=False)

    def run(*argv: str, token: str = OPERATOR) -> tuple[int, str, str]:
        code = main(["--url", api.url, "--token", token, *argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def pipeline_file(tmp_path):
    p = tmp_path / "pipeline.yaml"
    p.write_text(PIPELINE)
    return p


def _submit(cli, pipeline_file) -> str:
    code, out, _ = cli("submit", str(pipeline_file), "--json")
    assert code == 0
    return json.loads(out)["id"]


def test_submit_then_runs_table_and_json(cli, pipeline_file):
    code, out, err = cli("submit", str(pipeline_file))
    assert code == 0 and out.startswith("submitted run-") and "(cli-run)" in out
    run_id = out.split()[1]
    code, out, _ = cli("runs", token=VIEWER)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["ID", "NAME", "STATE", "STAGE", "LR_MULT", "GOODPUT", "UPDATED"]
    row = next(line for line in lines if line.startswith(run_id))
    assert row.split()[:4] == [run_id, "cli-run", "pending", "-"]
    # columns line up: every row's STATE starts where the header's does
    assert all(line.index(" pending") >= lines[0].index("STATE") - 1 for line in lines[1:] if "pending" in line)
    code, out, _ = cli("runs", "--json", token=VIEWER)
    assert code == 0 and run_id in [r["id"] for r in json.loads(out)["data"]]


def test_json_flag_works_before_the_subcommand(api, cli, pipeline_file, capsys):
    run_id = _submit(cli, pipeline_file)
    code = main(["--json", "--url", api.url, "--token", VIEWER, "status", run_id])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out)["id"] == run_id


def test_status_shows_run_and_stage_table(cli, pipeline_file):
    run_id = _submit(cli, pipeline_file)
    code, out, _ = cli("status", run_id, token=VIEWER)
    assert code == 0
    assert f"run            {run_id}" in out and "state          pending" in out
    stage_lines = out.split("\n\n")[1].splitlines()
    assert stage_lines[0].split()[:6] == ["#", "STAGE", "KIND", "STATE", "STEP", "STEPS"]
    assert stage_lines[1].split()[:6] == ["0", "pretrain", "pretrain", "pending", "0", "50"]


def test_control_commands_and_anneal_mixture(api, cli, pipeline_file):
    run_id = _submit(cli, pipeline_file)
    for action in ("pause", "resume", "stop"):
        code, out, _ = cli(action, run_id)
        assert code == 0 and out.strip() == f"{action}: {run_id} is pending"
    code, out, _ = cli("anneal", run_id, "--steps", "100", "--final-lr", "1e-5", "--schedule", "cosine",
                       "--mixture", "curated=0.9,web=0.1")
    assert code == 0 and "anneal sent" in out
    assert api.controller.calls[-1][2]["mixture"] == {"curated": 0.9, "web": 0.1}


def test_api_errors_are_one_line_on_stderr_with_exit_1(api, cli, pipeline_file):
    run_id = _submit(cli, pipeline_file)
    calls = len(api.controller.calls)
    code, out, err = cli("anneal", run_id, "--steps", "-4", "--final-lr", "0.1")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("trainguard: error: 422 Unprocessable") and "steps" in err
    code, _, err = cli("pause", run_id, token=VIEWER)
    assert code == 1 and "403" in err and "viewer token may not" in err
    code, _, err = cli("status", "run-0123456789ab")
    assert code == 1 and "404" in err and "run run-0123456789ab not found" in err
    assert len(api.controller.calls) == calls


def test_invalid_pipeline_file_names_the_field(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(PIPELINE.replace("steps: 50", "steps: -50"))
    code, out, err = cli("submit", str(bad))
    assert code == 1 and "stages.0.pretrain.steps" in err
    code, _, err = cli("submit", str(tmp_path / "missing.yaml"))
    assert code == 1 and "cannot read" in err


def test_bad_mixture_syntax_is_a_usage_error(cli, capsys):
    with pytest.raises(SystemExit) as e:
        main(["anneal", "run-0123456789ab", "--steps", "5", "--final-lr", "0.1", "--mixture", "curated:0.9"])
    assert e.value.code == 2 and "SOURCE=WEIGHT" in capsys.readouterr().err


def test_unreachable_server_is_one_line(monkeypatch, capsys):
    code = main(["--url", f"http://127.0.0.1:{free_port()}", "--token", "x", "runs"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot reach the supervisor" in err and err.count("\n") == 1


def test_checkpoints_incidents_events_tables(api, cli, pipeline_file):
    run_id = _submit(cli, pipeline_file)
    with Session(api.engine) as s:
        crud.upsert_checkpoint(s, run_id=run_id, stage_name="pretrain", step=20, batch_cursor=20,
                               path="/ck/step-20", verified=True, healthy=True, tags=["keep"])
        inc, _ = crud.create_incident(s, run_id=run_id, stage_name="pretrain", kind="loss_spike", onset_step=33,
                                      detected_at_step=35, dedup_key=f"{run_id}:x")
        crud.update_incident(s, incident=inc, action="rollback", rollback_to_step=20, skip=[[20, 300]],
                             lr_multiplier=0.5, outcome="resolved", recovery_seconds=4.25)
    code, out, _ = cli("checkpoints", run_id, token=VIEWER)
    assert out.splitlines()[0].split() == ["ID", "STAGE", "STEP", "CURSOR", "STATUS", "TAGS", "BAD_REASON", "PATH"]
    assert code == 0 and out.splitlines()[1].split()[1:] == ["pretrain", "20", "20", "good", "keep", "-", "/ck/step-20"]
    code, out, _ = cli("incidents", run_id, token=VIEWER)
    row = out.splitlines()[1].split()
    assert code == 0 and row[1:8] == ["pretrain", "loss_spike", "watch", "33", "35", "rollback", "20"]
    assert "[[20,300]]" in out and "resolved" in out and "4.25" in out
    code, out, _ = cli("events", run_id, token=VIEWER)
    assert code == 0 and "submitted" in out


def test_checkpoints_show_live_ones_and_deleted_ones_only_with_all(api, cli, pipeline_file):
    run_id = _submit(cli, pipeline_file)
    with Session(api.engine) as s:
        old, live = (crud.upsert_checkpoint(s, run_id=run_id, stage_name="pretrain", step=step, batch_cursor=step,
                                            path=f"/ck/step-{step}", verified=True, healthy=True) for step in (20, 40))
        crud.mark_checkpoint_deleted(s, checkpoint=old)
    code, out, _ = cli("checkpoints", run_id, token=VIEWER)
    assert code == 0 and [line.split()[2] for line in out.splitlines()[1:]] == ["40"]
    code, out, _ = cli("checkpoints", run_id, "--all", token=VIEWER)
    rows = {line.split()[2]: line.split()[4] for line in out.splitlines()[1:]}
    assert code == 0 and rows == {"20": "deleted", "40": "good"}  # deleted, never "unhealthy"
    code, out, _ = cli("checkpoints", run_id, "--all", "--limit", "1", token=VIEWER)
    assert code == 0 and out.splitlines()[-1] == "(1 of 2 from offset 0; see --limit/--offset)"


def test_rollback_command(api, cli, pipeline_file):
    run_id = _submit(cli, pipeline_file)
    code, out, _ = cli("rollback", run_id)
    assert code == 0 and out.strip() == f"rollback of {run_id}: incident 7, to step 40"
    code, _, err = cli("rollback", run_id, "--checkpoint", "999999")
    assert code == 1 and "checkpoint 999999 not found" in err


def test_rollback_sends_the_operators_skip_and_lr_choice(api, cli, pipeline_file):
    run_id = _submit(cli, pipeline_file)
    assert cli("rollback", run_id)[0] == 0
    assert cli("rollback", run_id, "--no-skip", "--lr-multiplier", "0.8")[0] == 0
    calls = [kw for name, _, kw in api.controller.calls if name == "rollback"]
    assert [(c["skip"], c["lr_multiplier"]) for c in calls] == [(True, None), (False, 0.8)]


def test_status_shows_the_live_step_loss_and_age_of_a_running_stage(api, cli, pipeline_file):
    run_id = _submit(cli, pipeline_file)
    with Session(api.engine) as s:
        crud.update_run(s, run=crud.get_run(s, run_id=run_id), current_stage="pretrain")
        crud.update_stage(s, run_id=run_id, name="pretrain", state="running", step=37, last_loss=2.3125,
                          last_step_at=datetime.now(timezone.utc) - timedelta(hours=2))  # "2h00m ago" for a minute
    code, out, _ = cli("status", run_id, token=VIEWER)
    header, row = out.split("\n\n")[1].splitlines()[:2]
    assert header.split()[4:8] == ["STEP", "STEPS", "LOSS", "LAST_STEP"]
    assert row.split()[3:9] == ["running", "37", "50", "2.312", "2h00m", "ago"]


def test_submit_wait_prints_progress_until_the_run_ends(api, cli, pipeline_file):
    def finish(run_id: str) -> None:
        with Session(api.engine) as s:
            run = crud.get_run(s, run_id=run_id)
            crud.update_run(s, run=run, current_stage="anneal")
            crud.update_stage(s, run_id=run_id, name="anneal", step=10)
            crud.set_run_state(s, run=run, state="completed", actor="supervisor", reason="done")

    api.controller.after_submit = finish
    code, out, err = cli("submit", str(pipeline_file), "--wait", "--interval", "0.05", "--timeout", "20")
    assert code == 0
    assert "completed  anneal step 10/10" in err
    assert "state          completed" in out


def test_submit_wait_shows_the_live_step_loss_and_age(api, cli, pipeline_file):
    def running(run_id: str) -> None:
        with Session(api.engine) as s:
            run = crud.get_run(s, run_id=run_id)
            crud.update_run(s, run=run, current_stage="pretrain")
            crud.update_stage(s, run_id=run_id, name="pretrain", state="running", step=12, last_loss=3.5,
                              last_step_at=datetime.now(timezone.utc) - timedelta(hours=1))
            crud.set_run_state(s, run=run, state="needs_attention", actor="supervisor", reason="test")

    api.controller.after_submit = running
    code, _, err = cli("submit", str(pipeline_file), "--wait", "--interval", "0.05", "--timeout", "20")
    assert code == 3
    assert re.search(r"needs_attention  pretrain step 12/50  loss 3\.5  last step 1h00m ago", err), err


def test_submit_wait_on_needs_attention_exits_3(api, cli, pipeline_file):
    def stuck(run_id: str) -> None:
        with Session(api.engine) as s:
            crud.set_run_state(s, run=crud.get_run(s, run_id=run_id), state="needs_attention", actor="supervisor",
                               reason="3 attempts")

    api.controller.after_submit = stuck
    code, _, err = cli("submit", str(pipeline_file), "--wait", "--interval", "0.05", "--timeout", "20")
    assert code == 3 and "needs attention" in err
