"""The store on SQLite and PostgreSQL: runs, stages, checkpoints, incidents, events."""
from __future__ import annotations

import threading
from datetime import timezone

import pytest
from sqlmodel import Session

from trainguard.service.db import crud
from trainguard.service.errors import NotFound

pytestmark = pytest.mark.integration

SPEC = (
    '{"name": "tiny", "stages": ['
    '{"name": "pretrain", "kind": "pretrain", "steps": 100},'
    '{"name": "sft", "kind": "sft", "steps": 30}]}'
)


def _run(session, name="tiny"):
    return crud.create_run(session, name=name, spec_json=SPEC, actor="operator")


def test_create_run_makes_its_stages_and_a_submitted_event(session):
    run = _run(session)
    assert run.id.startswith("run-") and len(run.id) == 16
    assert run.state == "pending" and run.lr_multiplier == 1.0
    assert run.created_at.tzinfo is not None
    stages = crud.list_stages(session, run_id=run.id)
    assert [(s.index, s.name, s.kind, s.steps, s.state) for s in stages] == [
        (0, "pretrain", "pretrain", 100, "pending"),
        (1, "sft", "sft", 30, "pending"),
    ]
    events = crud.list_events(session, run_id=run.id)
    assert [(e.actor, e.kind) for e in events] == [("operator", "submitted")]


def test_list_runs_pages_newest_first_and_filters_by_state(session):
    runs = [_run(session, name=f"r{i}") for i in range(5)]
    crud.set_run_state(session, run=runs[1], state="running", actor="supervisor", reason="start")
    page = crud.list_runs(session, limit=2, offset=0)
    assert [r.name for r in page] == ["r4", "r3"]
    assert [r.name for r in crud.list_runs(session, limit=10, offset=3)] == ["r1", "r0"]
    assert [r.id for r in crud.list_runs(session, limit=10, state="running")] == [runs[1].id]
    assert crud.count_runs(session) == 5 and crud.count_runs(session, state="running") == 1


def test_set_run_state_writes_an_event_and_rejects_unknown_states(session):
    run = _run(session)
    before = run.updated_at
    crud.set_run_state(session, run=run, state="running", actor="supervisor", reason="stage pretrain started")
    assert run.state == "running" and run.updated_at >= before
    ev = crud.list_events(session, run_id=run.id)[-1]
    assert ev.kind == "state" and ev.detail == {"from": "pending", "to": "running", "reason": "stage pretrain started"}
    with pytest.raises(ValueError, match="not one of"):
        crud.set_run_state(session, run=run, state="exploded", actor="x", reason="")


def test_update_run_and_stage_persist_fields(engine, session):
    run = _run(session)
    crud.update_run(session, run=run, current_stage="pretrain", lr_multiplier=0.5, goodput=0.9)
    stage = crud.get_stage(session, run_id=run.id, name="pretrain")
    crud.update_stage(session, stage=stage, state="running", step=40, first_loss=5.5)
    crud.update_stage(session, run_id=run.id, name="sft", restarts=2)
    with pytest.raises(TypeError, match="no updatable field"):
        crud.update_run(session, run=run, id="run-000000000000")
    with pytest.raises(NotFound):
        crud.update_stage(session, run_id=run.id, name="nope", step=1)
    with Session(engine) as fresh:
        r = crud.get_run(fresh, run_id=run.id)
        assert (r.current_stage, r.lr_multiplier, r.goodput) == ("pretrain", 0.5, 0.9)
        st = {s.name: s for s in crud.list_stages(fresh, run_id=run.id)}
        assert (st["pretrain"].state, st["pretrain"].step, st["pretrain"].first_loss) == ("running", 40, 5.5)
        assert st["sft"].restarts == 2


def _ckpt(session, run_id, step, *, path=None, healthy=True, verified=True, stage="pretrain"):
    return crud.upsert_checkpoint(
        session, run_id=run_id, stage_name=stage, step=step, batch_cursor=step,
        path=path or f"/ckpt/{run_id}/{stage}/step-{step:08d}", verified=verified, healthy=healthy,
        metrics={"train_loss": 2.0}, tags=["keep"] if step == 0 else [],
    )


def test_upsert_checkpoint_is_idempotent_and_keeps_bad_marks(session):
    run = _run(session)
    first = _ckpt(session, run.id, 20)
    again = _ckpt(session, run.id, 20)
    assert again.id == first.id
    crud.mark_checkpoint_bad(session, checkpoint=first, reason="sha256 mismatch in model.pt")
    rescanned = _ckpt(session, run.id, 20)  # a directory re-scan must not rehabilitate it
    assert rescanned.healthy is False and rescanned.bad_reason == "sha256 mismatch in model.pt"
    _ckpt(session, run.id, 40)
    _ckpt(session, run.id, 10, stage="sft")
    assert [c.step for c in crud.list_checkpoints(session, run_id=run.id, stage_name="pretrain")] == [20, 40]
    assert [c.step for c in crud.list_checkpoints(session, run_id=run.id, good_only=True)] == [10, 40]
    assert first.metrics == {"train_loss": 2.0}


def test_find_checkpoint_by_path_is_scoped_to_the_run_and_stage(session):
    run, other = _run(session), _run(session, name="other")
    mine = _ckpt(session, run.id, 20, path="/ckpt/shared/step-20")
    _ckpt(session, other.id, 20, path="/ckpt/shared/step-20")
    assert crud.find_checkpoint(session, run_id=run.id, path="/ckpt/shared/step-20").id == mine.id
    assert crud.find_checkpoint(session, run_id=run.id, path="/ckpt/shared/step-20", stage_name="sft") is None
    assert crud.find_checkpoint(session, run_id=run.id, path="/ckpt/shared/step-40") is None


def test_get_checkpoint_of_another_run_returns_none(session):
    mine, other = _run(session), _run(session)
    theirs = _ckpt(session, other.id, 20)
    assert crud.get_checkpoint(session, run_id=other.id, checkpoint_id=theirs.id).id == theirs.id
    assert crud.get_checkpoint(session, run_id=mine.id, checkpoint_id=theirs.id) is None
    assert crud.get_checkpoint(session, run_id=mine.id, checkpoint_id=999_999) is None


def _incident(session, run_id, key, **kw):
    return crud.create_incident(
        session, run_id=run_id, stage_name="pretrain", kind="loss_spike", onset_step=50, detected_at_step=53,
        source="watch", evidence={"score": 9.1}, dedup_key=key, **kw,
    )


def test_create_incident_is_idempotent_on_dedup_key(session):
    run = _run(session)
    inc, created = _incident(session, run.id, f"{run.id}:pretrain:loss_spike:50")
    again, created_again = _incident(session, run.id, f"{run.id}:pretrain:loss_spike:50")
    assert created and not created_again and again.id == inc.id
    assert inc.detected_at.tzinfo is not None and inc.detected_at.utcoffset() == timezone.utc.utcoffset(None)
    assert len(crud.list_incidents(session, run_id=run.id)) == 1


def test_create_incident_under_two_concurrent_sessions_makes_one(engine):
    with Session(engine) as s:
        run_id = _run(s).id
    key = f"{run_id}:pretrain:nan:7"
    barrier = threading.Barrier(2)
    results: list[tuple[int, bool]] = []
    errors: list[BaseException] = []

    def writer():
        try:
            with Session(engine) as s:
                barrier.wait(timeout=10)
                inc, created = _incident(s, run_id, key)
                results.append((inc.id, created))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert sorted(c for _, c in results) == [False, True]
    assert len({i for i, _ in results}) == 1


def test_update_incident_and_open_only_listing(session):
    run = _run(session)
    a, _ = _incident(session, run.id, "a")
    b, _ = _incident(session, run.id, "b", alert_fingerprints=["fp1"])
    crud.update_incident(session, incident=a, action="rollback", rollback_to_step=40, skip=[(40, 300)],
                         lr_multiplier=0.5, outcome="recovering")
    crud.update_incident(session, incident=b, outcome="resolved", recovery_seconds=3.5)
    assert b.resolved_at is not None
    assert a.skip == [[40, 300]]
    assert [i.id for i in crud.list_incidents(session, run_id=run.id, open_only=True)] == [a.id]
    assert crud.get_incident(session, incident_id=a.id).action == "rollback"
    assert crud.get_incident(session, run_id="run-000000000000", incident_id=a.id) is None
    with pytest.raises(ValueError, match="outcome"):
        crud.update_incident(session, incident=a, outcome="maybe")


def test_json_columns_mutated_in_place_are_saved(engine, session):
    run = _run(session)
    inc, _ = _incident(session, run.id, "k")
    inc.alert_fingerprints.append("fp2")
    crud.update_incident(session, incident=inc, alert_fingerprints=inc.alert_fingerprints)
    with Session(engine) as fresh:
        assert crud.get_incident(fresh, incident_id=inc.id).alert_fingerprints == ["fp2"]


def test_events_keep_order_and_detail(session):
    run = _run(session)
    crud.add_event(session, run_id=run.id, actor="operator", kind="pause", detail={"step": 12}, result="ok")
    crud.add_event(session, run_id=run.id, actor="webhook", kind="alert", detail={"n": 2}, result="merged")
    evs = crud.list_events(session, run_id=run.id)
    assert [e.kind for e in evs] == ["submitted", "pause", "alert"]
    assert evs[1].detail == {"step": 12}
    assert [e.kind for e in crud.list_events(session, run_id=run.id, limit=1, offset=1)] == ["pause"]


def test_create_incident_returns_the_winner_when_another_writer_inserted_after_our_read(engine, monkeypatch):
    """The race made deterministic: our existence check misses the other writer's row."""
    with Session(engine) as s:
        run_id = _run(s).id
    with Session(engine) as other:
        theirs, _ = _incident(other, run_id, "raced")
    real_find = crud.find_incident
    stale = iter([None])  # the first look sees the database as it was before their commit
    monkeypatch.setattr(crud, "find_incident", lambda session, *, dedup_key: next(stale, None) or real_find(session, dedup_key=dedup_key))
    with Session(engine) as mine:
        inc, created = _incident(mine, run_id, "raced")
        assert (inc.id, created) == (theirs.id, False)
        inc2, _ = _incident(mine, run_id, "after-the-race")  # the session is usable afterwards
        assert inc2.id != inc.id
