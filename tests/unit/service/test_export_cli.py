"""`trainguard export`: the errors a user meets before any weights are read (the round trip
itself runs in tests/integration/supervisor/test_hf_model.py)."""
from __future__ import annotations

import pytest
from sqlmodel import Session

from trainguard.service.cli import main
from trainguard.service.db import crud
from trainguard.service.db.engine import init_db
from trainguard.workers.spec import parse_pipeline


def _run(state_dir, model: dict) -> str:
    spec = parse_pipeline({"name": "t", "model": model, "stages": [{"name": "pretrain", "kind": "pretrain", "steps": 2}]})
    engine = init_db(f"sqlite:///{state_dir / 'trainguard.db'}")
    with Session(engine) as s:
        run_id = crud.create_run(s, name="t", spec_json=spec.model_dump_json(), actor="test").id
        stage = crud.get_stage(s, run_id=run_id, name="pretrain")
        crud.update_stage(s, stage=stage, output_checkpoint="/nowhere/step-00000002")
    engine.dispose()
    return run_id


def _export(capsys, *argv) -> tuple[int, str]:
    rc = main(["export", *argv])
    return rc, capsys.readouterr().err


def test_export_errors_are_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRAINGUARD_DATABASE_URL", raising=False)
    state = tmp_path / "state"
    state.mkdir()
    gpt = _run(state, {"n_layer": 1})
    hf = _run(state, {"hf": {"path": "/models/tiny"}})
    out = str(tmp_path / "out")
    rc, err = _export(capsys, "run-000000000000", "--stage", "pretrain", "--to", out, "--state-dir", str(state))
    assert rc == 1 and "no run 'run-000000000000'" in err
    rc, err = _export(capsys, hf, "--stage", "sft", "--to", out, "--state-dir", str(state))
    assert rc == 1 and "has no stage 'sft'" in err
    rc, err = _export(capsys, hf, "--stage", "pretrain", "--to", out, "--state-dir", str(state), "--checkpoint", "7")
    assert rc == 1 and "checkpoint 7 is not a checkpoint of stage 'pretrain'" in err
    rc, err = _export(capsys, gpt, "--stage", "pretrain", "--to", out, "--state-dir", str(state))
    assert rc == 1 and "needs a Hugging Face model" in err and "built-in GPT" in err
    rc, err = _export(capsys, hf, "--stage", "pretrain", "--to", out, "--state-dir", str(state))
    assert rc == 1 and "is not registered" in err
