"""Keyword-only store operations. Every write commits: callers get persisted rows back.

Writes that two writers may race on (incident dedup, checkpoint identity) insert
first and fall back to re-reading the winner's row on IntegrityError, so they are
safe across processes without locks.
"""
from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.attributes import flag_modified
from sqlmodel import Session, col, select

from trainguard.service.db.models import (
    INCIDENT_OUTCOMES,
    INCIDENT_SOURCES,
    OPEN_OUTCOMES,
    PROPOSAL_STATES,
    RECOVERY_MODES,
    RUN_LIST_VERSION_ID,
    RUN_STATES,
    STAGE_STATES,
    Checkpoint,
    Event,
    Incident,
    Proposal,
    Run,
    RunListVersion,
    RunStage,
    utcnow,
)
from trainguard.service.errors import NotFound

__all__ = [
    "new_run_id",
    "create_run",
    "get_run",
    "list_runs",
    "list_run_rows",
    "count_runs",
    "run_list_version",
    "set_run_state",
    "update_run",
    "get_stage",
    "list_stages",
    "update_stage",
    "update_stages_live",
    "upsert_checkpoint",
    "list_checkpoints",
    "count_checkpoints",
    "get_checkpoint",
    "mark_checkpoint_bad",
    "mark_checkpoint_deleted",
    "create_incident",
    "get_incident",
    "find_incident",
    "update_incident",
    "list_incidents",
    "count_incidents",
    "add_event",
    "list_events",
    "count_events",
    "create_proposal",
    "get_proposal",
    "update_proposal",
    "list_proposals",
    "count_proposals",
    "due_proposals",
]


def _value(v: Any) -> Any:
    """Accept str enums (RunState, ...) wherever a state string is stored."""
    return getattr(v, "value", v)


def _check_choice(field: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{field} {value!r} is not one of {', '.join(choices)}")


def _apply(obj: Any, fields: dict[str, Any], *, forbidden: Sequence[str] = ()) -> None:
    known = type(obj).model_fields
    for name, value in fields.items():
        if name not in known or name in forbidden:
            raise TypeError(f"{type(obj).__name__} has no updatable field {name!r}")
        setattr(obj, name, _value(value))
        if isinstance(value, (dict, list)):
            flag_modified(obj, name)  # JSON columns: also catch a mutated-in-place value


def _save(session: Session, obj: Any) -> Any:
    session.add(obj)
    session.commit()
    session.refresh(obj)
    return obj


# --- runs -----------------------------------------------------------------------------


def new_run_id() -> str:
    return f"run-{secrets.token_hex(6)}"


def create_run(session: Session, *, name: str, spec_json: str, actor: str, recovery_mode: str = "auto") -> Run:
    """Insert a run, one RunStage per spec stage (state pending) and a "submitted" event."""
    recovery_mode = _value(recovery_mode)
    _check_choice("recovery mode", recovery_mode, RECOVERY_MODES)
    spec = json.loads(spec_json)
    run = Run(id=new_run_id(), name=name, spec=spec_json, recovery_mode=recovery_mode)
    session.add(run)
    session.flush()  # no ORM relationships: the run row must exist before rows pointing at it
    for index, stage in enumerate(spec.get("stages", [])):
        session.add(
            RunStage(run_id=run.id, index=index, name=stage["name"], kind=stage["kind"], steps=int(stage["steps"]))
        )
    session.add(Event(run_id=run.id, actor=actor, kind="submitted", detail={"name": name, "recovery_mode": recovery_mode},
                      result="ok"))
    return _save(session, run)


def get_run(session: Session, *, run_id: str) -> Run | None:
    return session.get(Run, run_id)


def list_runs(session: Session, *, limit: int = 100, offset: int = 0, state: str | None = None) -> list[Run]:
    """Newest first."""
    q = select(Run)
    if state is not None:
        q = q.where(Run.state == _value(state))
    q = q.order_by(col(Run.created_at).desc(), col(Run.id).desc()).offset(offset).limit(limit)
    return list(session.exec(q).all())


def list_run_rows(session: Session, *, limit: int = 100, offset: int = 0,
                  state: str | None = None) -> list[dict[str, Any]]:
    """`list_runs` as plain column dicts, the spec left as its stored JSON text (the list
    endpoint splices it into its answer without parsing it)."""
    t = Run.__table__  # type: ignore[attr-defined]
    q = sa.select(*t.c)
    if state is not None:
        q = q.where(t.c.state == _value(state))
    q = q.order_by(t.c.created_at.desc(), t.c.id.desc()).offset(offset).limit(limit)
    return [dict(row) for row in session.connection().execute(q).mappings()]


def count_runs(session: Session, *, state: str | None = None) -> int:
    q = select(func.count()).select_from(Run)
    if state is not None:
        q = q.where(Run.state == _value(state))
    return session.exec(q).one()


_RUN_LIST_VERSION = sa.select(RunListVersion.__table__.c.epoch, RunListVersion.__table__.c.version).where(  # type: ignore[attr-defined]
    RunListVersion.__table__.c.id == RUN_LIST_VERSION_ID  # type: ignore[attr-defined]
)


def run_list_version(connection: sa.Connection) -> tuple[str, int] | None:
    """(epoch, version) of the `run` table: it changes with every committed write to `run`, by
    any process (database triggers, migration 0005, bump it in the writer's own transaction), so
    two reads that return the same pair saw the same runs. None when the row is missing: then
    nothing may be cached. Read it before the rows it vouches for."""
    row = connection.execute(_RUN_LIST_VERSION).first()
    return None if row is None else (str(row[0]), int(row[1]))


def set_run_state(session: Session, *, run: Run, state: str, actor: str, reason: str | None = None) -> Run:
    """Persist a state change and its event. Which transitions are legal is the domain's call."""
    state = _value(state)
    _check_choice("run state", state, RUN_STATES)
    previous = run.state
    run.state = state
    run.updated_at = utcnow()
    session.add(
        Event(
            run_id=run.id,
            actor=actor,
            kind="state",
            detail={"from": previous, "to": state, "reason": reason},
            result="ok",
        )
    )
    return _save(session, run)


def update_run(session: Session, *, run: Run, **fields: Any) -> Run:
    """Set any of Run's fields but id/created_at (use set_run_state for state: it logs)."""
    _apply(run, fields, forbidden=("id", "created_at"))
    if "state" in fields:
        _check_choice("run state", run.state, RUN_STATES)
    run.updated_at = utcnow()
    return _save(session, run)


# --- stages ---------------------------------------------------------------------------


def get_stage(session: Session, *, run_id: str, name: str) -> RunStage | None:
    return session.exec(select(RunStage).where(RunStage.run_id == run_id, RunStage.name == name)).first()


def list_stages(session: Session, *, run_id: str) -> list[RunStage]:
    return list(session.exec(select(RunStage).where(RunStage.run_id == run_id).order_by(col(RunStage.index))).all())


def update_stage(
    session: Session,
    *,
    stage: RunStage | None = None,
    run_id: str | None = None,
    name: str | None = None,
    **fields: Any,
) -> RunStage:
    """Update a stage given as `stage=` or as `run_id=` + `name=` (NotFound if there is none)."""
    if stage is None:
        if run_id is None or name is None:
            raise TypeError("update_stage() needs stage= or run_id= and name=")
        stage = get_stage(session, run_id=run_id, name=name)
        if stage is None:
            raise NotFound(f"stage {name!r} not found in run {run_id}")
    _apply(stage, fields, forbidden=("id", "run_id", "index", "name", "kind"))
    if "state" in fields:
        _check_choice("stage state", stage.state, STAGE_STATES)
    return _save(session, stage)


def update_stages_live(
    session: Session, rows: Sequence[tuple[str, str, int, float | None, datetime | None]]
) -> None:
    """Set (step, last_loss, last_step_at) of many stages, each given as (run_id, name, step,
    last_loss, last_step_at), in one executemany and one commit; a stage that does not exist is
    skipped. Only those three columns are written."""
    if not rows:
        return
    t = RunStage.__table__  # type: ignore[attr-defined]
    stmt = (
        sa.update(t)
        .where(t.c.run_id == sa.bindparam("b_run_id"), t.c.name == sa.bindparam("b_name"))
        .values(step=sa.bindparam("b_step"), last_loss=sa.bindparam("b_last_loss"),
                last_step_at=sa.bindparam("b_last_step_at"))
    )
    session.connection().execute(stmt, [
        {"b_run_id": run_id, "b_name": name, "b_step": int(step), "b_last_loss": last_loss, "b_last_step_at": at}
        for run_id, name, step, last_loss, at in rows
    ])
    session.commit()


# --- checkpoints ----------------------------------------------------------------------


def _find_checkpoint(session: Session, *, run_id: str, stage_name: str, step: int, path: str) -> Checkpoint | None:
    q = select(Checkpoint).where(
        Checkpoint.run_id == run_id, Checkpoint.stage_name == stage_name, Checkpoint.step == step, Checkpoint.path == path
    )
    return session.exec(q).first()


def upsert_checkpoint(
    session: Session,
    *,
    run_id: str,
    stage_name: str,
    step: int,
    batch_cursor: int,
    path: str,
    verified: bool,
    healthy: bool,
    metrics: dict[str, Any] | None = None,
    tags: list[str] | None = None,
    files: dict[str, Any] | None = None,
) -> Checkpoint:
    """Insert or update the checkpoint identified by (run, stage, step, path).

    Updating with the same `files` keeps `healthy=False` once a checkpoint was marked bad: a
    repeated report must not rehabilitate it. Different `files` at the same path are a new
    checkpoint (a step rewritten after a rollback): its verdicts start afresh."""
    fields: dict[str, Any] = dict(batch_cursor=batch_cursor, verified=verified, metrics=dict(metrics or {}),
                                  tags=list(tags or []))
    if files is not None:
        fields["files"] = dict(files)
    for attempt in range(2):
        ckpt = _find_checkpoint(session, run_id=run_id, stage_name=stage_name, step=step, path=path)
        if ckpt is not None:
            if files is not None and dict(files) != dict(ckpt.files or {}):
                ckpt.bad_reason, ckpt.deleted_at = None, None
                ckpt.created_at = utcnow()
            _apply(ckpt, fields)
            ckpt.healthy = healthy and ckpt.bad_reason is None
            return _save(session, ckpt)
        try:
            new = Checkpoint(run_id=run_id, stage_name=stage_name, step=step, path=path, healthy=healthy, **fields)
            return _save(session, new)
        except IntegrityError:
            session.rollback()  # another writer inserted it first: update theirs
            if attempt:
                raise
    raise AssertionError("unreachable")


def _checkpoints_query(run_id: str, stage_name: str | None, good_only: bool, include_deleted: bool) -> Any:
    q = select(Checkpoint).where(Checkpoint.run_id == run_id)
    if stage_name is not None:
        q = q.where(Checkpoint.stage_name == stage_name)
    if good_only:
        q = q.where(col(Checkpoint.verified).is_(True), col(Checkpoint.healthy).is_(True),
                    col(Checkpoint.bad_reason).is_(None), col(Checkpoint.deleted_at).is_(None))
    if not include_deleted:
        q = q.where(col(Checkpoint.deleted_at).is_(None))
    return q


def list_checkpoints(
    session: Session, *, run_id: str, stage_name: str | None = None, good_only: bool = False,
    include_deleted: bool = True, limit: int | None = None, offset: int = 0,
) -> list[Checkpoint]:
    """Oldest first (by step). `good_only`: verified, healthy, not bad, not deleted.
    `include_deleted=False`: only checkpoints that still exist."""
    q = _checkpoints_query(run_id, stage_name, good_only, include_deleted)
    q = q.order_by(col(Checkpoint.step), col(Checkpoint.id)).offset(offset)
    if limit is not None:
        q = q.limit(limit)
    return list(session.exec(q).all())


def count_checkpoints(session: Session, *, run_id: str, stage_name: str | None = None, good_only: bool = False,
                      include_deleted: bool = True) -> int:
    q = _checkpoints_query(run_id, stage_name, good_only, include_deleted)
    return session.exec(select(func.count()).select_from(q.subquery())).one()


def find_checkpoint(session: Session, *, run_id: str, path: str, stage_name: str | None = None) -> Checkpoint | None:
    """The run's checkpoint registered at `path` (the newest row if it was registered twice)."""
    q = select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.path == path)
    if stage_name is not None:
        q = q.where(Checkpoint.stage_name == stage_name)
    return session.exec(q.order_by(col(Checkpoint.id).desc()).limit(1)).first()


def get_checkpoint(session: Session, *, run_id: str, checkpoint_id: int) -> Checkpoint | None:
    """None when the id is unknown or belongs to another run."""
    ckpt = session.get(Checkpoint, checkpoint_id)
    if ckpt is None or ckpt.run_id != run_id:
        return None
    return ckpt


def mark_checkpoint_bad(session: Session, *, checkpoint: Checkpoint, reason: str) -> Checkpoint:
    """Corrupt or otherwise unusable (never used for a checkpoint that is merely gone)."""
    checkpoint.healthy = False
    checkpoint.bad_reason = reason
    return _save(session, checkpoint)


def mark_checkpoint_deleted(session: Session, *, checkpoint: Checkpoint) -> Checkpoint:
    """Removed by retention or a rollback: gone, not unhealthy."""
    if checkpoint.deleted_at is None:
        checkpoint.deleted_at = utcnow()
    return _save(session, checkpoint)


# --- incidents ------------------------------------------------------------------------


def find_incident(session: Session, *, dedup_key: str) -> Incident | None:
    return session.exec(select(Incident).where(Incident.dedup_key == dedup_key)).first()


def get_incident(session: Session, *, incident_id: int, run_id: str | None = None) -> Incident | None:
    """None when the id is unknown or (given `run_id`) belongs to another run."""
    inc = session.get(Incident, incident_id)
    if inc is None or (run_id is not None and inc.run_id != run_id):
        return None
    return inc


def create_incident(
    session: Session,
    *,
    run_id: str,
    kind: str,
    dedup_key: str,
    stage_name: str | None = None,
    onset_step: int | None = None,
    detected_at_step: int | None = None,
    source: str = "watch",
    evidence: dict[str, Any] | None = None,
    action: str | None = None,
    rollback_to_step: int | None = None,
    skip: list[list[int]] | None = None,
    lr_multiplier: float | None = None,
    attempt: int = 1,
    outcome: str = "open",
    alert_fingerprints: list[str] | None = None,
) -> tuple[Incident, bool]:
    """The incident for `dedup_key`: (existing, False) or (new, True).

    Idempotent and race-safe: when another session inserts the same key between
    our read and our commit, the unique constraint rejects ours and we return theirs."""
    source, outcome = _value(source), _value(outcome)
    _check_choice("incident source", source, INCIDENT_SOURCES)
    _check_choice("incident outcome", outcome, INCIDENT_OUTCOMES)
    existing = find_incident(session, dedup_key=dedup_key)
    if existing is not None:
        return existing, False
    inc = Incident(
        run_id=run_id,
        kind=_value(kind),
        dedup_key=dedup_key,
        stage_name=stage_name,
        onset_step=onset_step,
        detected_at_step=detected_at_step,
        source=source,
        evidence=dict(evidence or {}),
        action=action,
        rollback_to_step=rollback_to_step,
        skip=[list(r) for r in (skip or [])],
        lr_multiplier=lr_multiplier,
        attempt=attempt,
        outcome=outcome,
        alert_fingerprints=list(alert_fingerprints or []),
    )
    try:
        return _save(session, inc), True
    except IntegrityError:
        session.rollback()
        winner = find_incident(session, dedup_key=dedup_key)
        if winner is None:  # the IntegrityError was something else (e.g. unknown run_id)
            raise
        return winner, False


def update_incident(session: Session, *, incident: Incident, **fields: Any) -> Incident:
    _apply(incident, fields, forbidden=("id", "run_id", "dedup_key"))
    if "outcome" in fields:
        _check_choice("incident outcome", incident.outcome, INCIDENT_OUTCOMES)
        if incident.outcome not in OPEN_OUTCOMES and incident.resolved_at is None:
            incident.resolved_at = utcnow()
    if "skip" in fields:
        incident.skip = [list(r) for r in incident.skip]
    return _save(session, incident)


def _incidents_query(run_id: str, open_only: bool) -> Any:
    q = select(Incident).where(Incident.run_id == run_id)
    if open_only:
        q = q.where(col(Incident.outcome).in_(OPEN_OUTCOMES))
    return q


def list_incidents(session: Session, *, run_id: str, open_only: bool = False, limit: int | None = None,
                   offset: int = 0) -> list[Incident]:
    """Oldest first. `open_only`: outcome open or recovering."""
    q = _incidents_query(run_id, open_only).order_by(col(Incident.id)).offset(offset)
    if limit is not None:
        q = q.limit(limit)
    return list(session.exec(q).all())


def count_incidents(session: Session, *, run_id: str, open_only: bool = False) -> int:
    q = _incidents_query(run_id, open_only)
    return session.exec(select(func.count()).select_from(q.subquery())).one()


# --- events ---------------------------------------------------------------------------


def add_event(
    session: Session, *, run_id: str, actor: str, kind: str, detail: dict[str, Any] | None = None, result: str | None = None
) -> Event:
    return _save(session, Event(run_id=run_id, actor=actor, kind=kind, detail=dict(detail or {}), result=result))


def list_events(session: Session, *, run_id: str, limit: int | None = None, offset: int = 0) -> list[Event]:
    """Oldest first."""
    q = select(Event).where(Event.run_id == run_id).order_by(col(Event.id)).offset(offset)
    if limit is not None:
        q = q.limit(limit)
    return list(session.exec(q).all())


def count_events(session: Session, *, run_id: str) -> int:
    return session.exec(select(func.count()).select_from(Event).where(Event.run_id == run_id)).one()


# --- proposals ------------------------------------------------------------------------


def create_proposal(session: Session, *, run_id: str, **fields: Any) -> Proposal:
    prop = Proposal(run_id=run_id, **{k: _value(v) for k, v in fields.items()})
    _check_choice("proposal state", prop.state, PROPOSAL_STATES)
    _check_choice("recovery mode", prop.mode, RECOVERY_MODES)
    return _save(session, prop)


def get_proposal(session: Session, *, run_id: str, proposal_id: int) -> Proposal | None:
    """None when the id is unknown or belongs to another run."""
    prop = session.get(Proposal, proposal_id)
    if prop is None or prop.run_id != run_id:
        return None
    return prop


def update_proposal(session: Session, *, proposal: Proposal, **fields: Any) -> Proposal:
    _apply(proposal, fields, forbidden=("id", "run_id"))
    if "state" in fields:
        _check_choice("proposal state", proposal.state, PROPOSAL_STATES)
    return _save(session, proposal)


def _proposals_query(run_id: str, state: str | None, stage_name: str | None) -> Any:
    q = select(Proposal).where(Proposal.run_id == run_id)
    if state is not None:
        q = q.where(Proposal.state == _value(state))
    if stage_name is not None:
        q = q.where(Proposal.stage_name == stage_name)
    return q


def list_proposals(session: Session, *, run_id: str, state: str | None = None, stage_name: str | None = None,
                   limit: int | None = None, offset: int = 0) -> list[Proposal]:
    """Oldest first."""
    q = _proposals_query(run_id, state, stage_name).order_by(col(Proposal.id)).offset(offset)
    if limit is not None:
        q = q.limit(limit)
    return list(session.exec(q).all())


def count_proposals(session: Session, *, run_id: str, state: str | None = None) -> int:
    q = _proposals_query(run_id, state, None)
    return session.exec(select(func.count()).select_from(q.subquery())).one()


def due_proposals(session: Session, *, now: Any) -> list[Proposal]:
    """Proposals still waiting whose auto-apply time has come, oldest first (every run)."""
    q = select(Proposal).where(Proposal.state == "proposed", col(Proposal.auto_apply_at).is_not(None),
                               col(Proposal.auto_apply_at) <= now).order_by(col(Proposal.id))
    return list(session.exec(q).all())
