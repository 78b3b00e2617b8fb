"""GET /runs' page cache and the run-list version it is keyed on (migration 0005), on a real
SQLite file and a real PostgreSQL: every write to `run` bumps the version in its own transaction,
whoever makes it, and a write made by another process shows up in the next GET /runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from fastapi.testclient import TestClient
from sqlmodel import Session

from trainguard.service.api import create_app
from trainguard.service.api.routes.runs import _runs_page
from trainguard.service.config import Settings
from trainguard.service.db import crud, init_db, make_engine
from trainguard.service.db.engine import alembic_config
from trainguard.service.db.models import Run, RunPublic
from tests.integration.api.conftest import RecordingControllerForApiTests

pytestmark = pytest.mark.integration

VIEWER, OPERATOR, WEBHOOK = "viewer-test-token-1234", "operator-test-token-1234", "webhook-test-token-1234"
SPEC = '{"name": "tiny", "stages": [{"name": "pretrain", "kind": "pretrain", "steps": 100}]}'
ROOT = Path(__file__).resolve().parents[3]


def _version(engine) -> tuple[str, int]:
    with engine.connect() as c:
        v = crud.run_list_version(c)
    assert v is not None
    return v


def _run(engine, name: str = "r") -> str:
    with Session(engine) as s:
        return crud.create_run(s, name=name, spec_json=SPEC, actor="operator").id


@pytest.fixture
def served(engine, tmp_path):
    """A TestClient over the real app on the fixture's store (SQLite file or PostgreSQL)."""
    settings = Settings(environment="development", state_dir=tmp_path, database_url=str(engine.url),
                        viewer_token=VIEWER, operator_token=OPERATOR, webhook_token=WEBHOOK)
    app = create_app(settings, RecordingControllerForApiTests(engine), engine=engine)
    with TestClient(app, headers={"Authorization": f"Bearer {VIEWER}"}) as client:
        yield client


def _page(client, **params) -> dict[str, Any]:
    r = client.get("/api/v1/runs", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def _fresh(engine, limit=100, offset=0, state=None) -> dict[str, Any]:
    """The page built from the store now, without any cache."""
    return json.loads(_runs_page(engine, None, (limit, offset, state)))


# --- the version ----------------------------------------------------------------------------------


def test_every_crud_write_to_a_run_bumps_the_version_and_other_writes_do_not(engine):
    v0 = _version(engine)
    run_id = _run(engine)
    v1 = _version(engine)
    assert v1[0] == v0[0] and v1[1] > v0[1]
    with Session(engine) as s:
        run = crud.get_run(s, run_id=run_id)
        crud.set_run_state(s, run=run, state="running", actor="supervisor", reason="go")
        v2 = _version(engine)
        crud.update_run(s, run=run, goodput=0.5, current_stage="pretrain")
        v3 = _version(engine)
        assert v1[1] < v2[1] < v3[1]
        # not on the list page: stages (the watch's batched live rows included), events, incidents,
        # checkpoints leave the version alone
        crud.update_stage(s, run_id=run_id, name="pretrain", state="running")
        crud.update_stages_live(s, [(run_id, "pretrain", 7, 2.5, None)])
        crud.add_event(s, run_id=run_id, actor="x", kind="note")
        crud.create_incident(s, run_id=run_id, kind="nan", dedup_key=f"{run_id}:nan")
        crud.upsert_checkpoint(s, run_id=run_id, stage_name="pretrain", step=10, batch_cursor=10, path="/c/10",
                               verified=True, healthy=True)
    assert _version(engine) == v3


def test_writes_outside_crud_bump_it_too_and_a_rollback_does_not(engine):
    run_id = _run(engine)
    v = _version(engine)
    with Session(engine) as s:  # an ORM write no crud function made
        run = s.get(Run, run_id)
        run.error = "set by hand"
        s.add(run)
        s.commit()
    assert _version(engine)[1] > v[1]
    v = _version(engine)
    with engine.begin() as c:  # hand-written SQL: an update, an insert and a delete
        c.execute(sa.text("UPDATE run SET name = 'renamed' WHERE id = :id"), {"id": run_id})
        c.execute(sa.text("INSERT INTO run (id, name, spec, state, lr_multiplier, recovery_mode, created_at, "
                          "updated_at) VALUES ('run-00000000beef', 'raw', '{}', 'pending', 1.0, 'auto', "
                          ":t, :t)"), {"t": "2026-01-01 00:00:00+00:00"})
    v_mid = _version(engine)
    assert v_mid[1] > v[1]
    with engine.begin() as c:
        c.execute(sa.text("DELETE FROM run WHERE id = 'run-00000000beef'"))
    assert _version(engine)[1] > v_mid[1]
    v = _version(engine)
    with engine.connect() as c:
        c.execute(sa.text("UPDATE run SET name = 'never' WHERE id = :id"), {"id": run_id})
        c.rollback()
    assert _version(engine) == v


def test_the_bump_is_visible_exactly_when_the_write_is(engine):
    """Another connection sees the old version until the writer commits, then both together."""
    run_id = _run(engine)
    v = _version(engine)
    with engine.connect() as writer:
        writer.execute(sa.text("UPDATE run SET state = 'running' WHERE id = :id"), {"id": run_id})
        with engine.connect() as reader:  # uncommitted: neither the row nor the bump
            assert crud.run_list_version(reader) == v
            assert reader.execute(sa.text("SELECT state FROM run WHERE id = :id"), {"id": run_id}).scalar() == "pending"
        writer.commit()
    with engine.connect() as reader:
        assert crud.run_list_version(reader)[1] > v[1]
        assert reader.execute(sa.text("SELECT state FROM run WHERE id = :id"), {"id": run_id}).scalar() == "running"


def test_a_rebuilt_store_starts_a_new_epoch_and_downgrade_removes_the_triggers(engine):
    e1, _ = _version(engine)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0004")
    assert "run_list_version" not in sa.inspect(engine).get_table_names()
    _run(engine)  # no trigger left pointing at the dropped table
    init_db(engine)
    e2, n = _version(engine)
    assert e2 != e1 and n == 0


def test_the_list_page_has_only_run_columns():
    """The version covers the `run` table only: a list field from another table (a stage's live
    step, an incident count) would need its own bump, or the cache would serve it stale."""
    assert set(RunPublic.model_fields) == set(Run.__table__.columns.keys())  # type: ignore[attr-defined]


# --- the cache behind GET /runs ------------------------------------------------------------------


def test_each_write_path_shows_up_in_the_next_get(engine, served):
    run_id = served.post("/api/v1/runs", json={"spec": json.loads(SPEC)},
                         headers={"Authorization": f"Bearer {OPERATOR}"}).json()["id"]
    assert _page(served)["data"][0]["id"] == run_id  # submit
    assert _page(served) == _fresh(engine)  # a hit answers the same
    with Session(engine) as s:
        run = crud.get_run(s, run_id=run_id)
        crud.set_run_state(s, run=run, state="running", actor="supervisor", reason="go")
        assert _page(served)["data"][0]["state"] == "running"
        crud.update_run(s, run=run, goodput=0.25)
        assert _page(served)["data"][0]["goodput"] == 0.25
        crud.update_run(s, run=run, current_stage="pretrain", lr_multiplier=0.5)
        got = _page(served)["data"][0]
        assert (got["current_stage"], got["lr_multiplier"]) == ("pretrain", 0.5)
        crud.update_stages_live(s, [(run_id, "pretrain", 42, 1.5, None)])  # the watch's batched write
    assert _page(served) == _fresh(engine)
    assert served.get(f"/api/v1/runs/{run_id}").json()["stages"][0]["step"] == 42  # the detail is not cached
    with engine.begin() as c:
        c.execute(sa.text("UPDATE run SET error = 'by hand' WHERE id = :id"), {"id": run_id})
    assert _page(served)["data"][0]["error"] == "by hand"


WRITER = r"""
import sys
from sqlmodel import Session
from trainguard.service.db import crud, make_engine
from trainguard.service.domain.state import RunState
from trainguard.service.supervisor.ledger import Ledger, LiveRow
engine = make_engine(sys.argv[1])
ledger = Ledger(engine)
for line in sys.stdin:
    op, run_id, *rest = line.split()
    if op == "submit":
        run_id = ledger.create_run(name=rest[0], spec_json=sys.argv[2], actor="operator")
    elif op == "state":
        ledger.set_state(run_id, RunState(rest[0]), actor="supervisor", reason="test")
    elif op == "start_stage":
        ledger.start_stage(run_id, rest[0])
    elif op == "goodput":
        ledger.update_run(run_id, goodput=float(rest[0]))
    elif op == "live":
        ledger.update_stages_live([LiveRow(run_id, "pretrain", int(rest[0]), 1.0, None)])
    print(run_id, flush=True)
"""


def test_writes_by_another_process_show_up_in_the_next_get(engine, served):
    """The supervisor in its own process (its Ledger, the real write path) and the API here."""
    for i in range(3):
        _run(engine, name=f"old{i}")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(engine.url.render_as_string(hide_password=False)),
                             SPEC], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def write(*cmd: str) -> str:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(" ".join(cmd) + "\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    try:
        warm = _page(served, limit=2)  # cached before every write below
        assert _page(served, limit=2) == warm
        run_id = write("submit", "-", "theirs")
        assert _page(served, limit=2)["data"][0]["id"] == run_id
        assert _page(served, limit=2)["count"] == warm["count"] + 1
        write("state", run_id, "running")
        assert _page(served, limit=2)["data"][0]["state"] == "running"
        assert [r["id"] for r in _page(served, state="running")["data"]] == [run_id]
        write("start_stage", run_id, "pretrain")
        assert _page(served, limit=2)["data"][0]["current_stage"] == "pretrain"
        write("goodput", run_id, "0.75")
        assert _page(served, limit=2)["data"][0]["goodput"] == 0.75
        write("live", run_id, "17")
        assert served.get(f"/api/v1/runs/{run_id}").json()["stages"][0]["step"] == 17
        write("state", run_id, "paused")
        assert _page(served, state="running")["data"] == []
        for params in ({}, {"limit": 2}, {"state": "paused"}, {"limit": 1, "offset": 3}):
            assert _page(served, **params) == _fresh(engine, **params)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0


def test_pages_of_different_queries_are_not_mixed_up(engine, served):
    ids = [_run(engine, name=f"r{i}") for i in range(5)]
    with Session(engine) as s:
        crud.set_run_state(s, run=crud.get_run(s, run_id=ids[1]), state="running", actor="x", reason="go")
    queries = [{}, {"limit": 2}, {"limit": 2, "offset": 2}, {"offset": 4}, {"state": "running"},
               {"state": "pending", "limit": 1}, {"state": "failed"}]
    for _ in range(2):  # the second round answers from the cache
        for q in queries:
            assert _page(served, **q) == _fresh(engine, **q), q
    assert [r["name"] for r in _page(served, limit=2, offset=2)["data"]] == ["r2", "r1"]
    assert [r["id"] for r in _page(served, state="running")["data"]] == [ids[1]]
    assert _page(served, state="failed") == {"data": [], "count": 0}
    # an ignored extra parameter is the same query
    assert served.get("/api/v1/runs", params={"limit": 2, "x": "y"}).json() == _page(served, limit=2)


def test_the_cache_answers_no_one_the_auth_check_refuses(engine, served):
    _run(engine)
    page = _page(served)
    assert _page(served) == page  # warm
    no_token = served.get("/api/v1/runs", headers={"Authorization": ""})
    assert no_token.status_code == 401
    assert served.get("/api/v1/runs", headers={"Authorization": "Bearer guess"}).status_code == 401
    assert served.get("/api/v1/runs", headers={"Authorization": f"Bearer {WEBHOOK}"}).status_code == 403
    # every role that may list runs sees every run: the same page
    assert served.get("/api/v1/runs", headers={"Authorization": f"Bearer {OPERATOR}"}).json() == page


def test_a_store_rebuilt_under_the_api_is_not_answered_from_the_old_cache(engine, served):
    """After downgrade + upgrade the version counts from 0 again: the epoch tells the two apart."""
    _run(engine, name="before")
    before = _page(served)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0004")
        for table in ("event", "run_stage", "run"):  # emptied while no trigger counts it
            conn.execute(sa.text(f"DELETE FROM {table}"))
    init_db(engine)
    _run(engine, name="after")  # the same version number as `before` was cached under
    assert _version(engine)[1] == 1
    after = _page(served)
    assert [r["name"] for r in before["data"]] == ["before"]
    assert [r["name"] for r in after["data"]] == ["after"]
