"""The ledger: every write the supervisor makes to the store, and the per-run locks.

Runs, stages, incidents, checkpoints and the event log are rows (service/db); the rest of the
supervisor reads and writes them only through here, in the domain's terms (RunState,
StageState, Attempt, CheckpointInfo). A decision about a run happens under that run's lock
(`lock`), so the same problem reported twice (watch and alert, or two alerts) is recovered once.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, NamedTuple, TypeVar

from sqlmodel import Session

from trainguard.service import errors
from trainguard.service.db import crud
from trainguard.service.db.models import Checkpoint, Incident, Proposal, Run
from trainguard.service.domain.policy import Attempt, CheckpointInfo
from trainguard.service.domain.state import FINAL_STAGE_STATES, RunState, StageState, transition_to
from trainguard.workers.contract import CheckpointRef, CheckpointReport

__all__ = ["Ledger", "LiveRow", "jsonable", "finite", "row_id"]

log = logging.getLogger(__name__)

StateListener = Callable[[str, RunState], None]


class LiveRow(NamedTuple):
    """A running stage's live progress, as the watch writes it to the stage row."""

    run_id: str
    stage: str
    step: int
    last_loss: float | None
    last_step_at: datetime | None


class Ledger:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._state_listeners: list[StateListener] = []

    # ---- plumbing ----------------------------------------------------------------------------
    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s:
            yield s

    @staticmethod
    def now() -> datetime:
        return datetime.now(timezone.utc)

    def lock(self, run_id: str) -> threading.RLock:
        """The run's decision lock (re-entrant)."""
        with self._locks_guard:
            return self._locks.setdefault(run_id, threading.RLock())

    def on_state_change(self, listener: StateListener) -> None:
        self._state_listeners.append(listener)

    # ---- runs --------------------------------------------------------------------------------
    def run(self, run_id: str) -> Run:
        with self.session() as s:
            run = crud.get_run(s, run_id=run_id)
        if run is None:
            raise errors.NotFound(f"run {run_id!r} not found")
        return run

    def run_state(self, run_id: str) -> RunState:
        return RunState(self.run(run_id).state)

    def create_run(self, *, name: str, spec_json: str, actor: str, recovery_mode: str = "auto") -> str:
        with self.session() as s:
            return crud.create_run(s, name=name, spec_json=spec_json, actor=actor, recovery_mode=recovery_mode).id

    def runs_in(self, states: frozenset[RunState]) -> list[Run]:
        with self.session() as s:
            return [r for r in crud.list_runs(s, limit=100_000, offset=0) if r.state in states]

    def set_state(self, run_id: str, state: RunState, *, actor: str, reason: str) -> None:
        """Move the run to `state` (an illegal move raises), with an event; listeners hear of it."""
        with self.lock(run_id), self.session() as s:
            run = crud.get_run(s, run_id=run_id)
            if run is None or run.state == state:
                return
            transition_to(RunState(run.state), state)
            crud.set_run_state(s, run=run, state=state.value, actor=actor, reason=reason)
        for listener in self._state_listeners:
            listener(run_id, state)

    def update_run(self, run_id: str, **fields: Any) -> None:
        with self.session() as s:
            crud.update_run(s, run=_found(crud.get_run(s, run_id=run_id), f"run {run_id!r}"), **fields)

    def event(self, run_id: str, actor: str, kind: str, detail: dict[str, Any], result: str) -> None:
        with self.session() as s:
            crud.add_event(s, run_id=run_id, actor=actor, kind=kind, detail=jsonable(detail), result=result)

    def last_event(self, run_id: str, kind: str, **match: Any) -> dict[str, Any] | None:
        """The detail of the run's newest `kind` event whose detail has every `match` item."""
        with self.session() as s:
            events = crud.list_events(s, run_id=run_id)
        for e in reversed(events):
            detail = dict(e.detail or {})
            if e.kind == kind and all(detail.get(k) == v for k, v in match.items()):
                return detail
        return None

    # ---- stages ------------------------------------------------------------------------------
    def stages(self, run_id: str) -> list[Any]:
        with self.session() as s:
            return crud.list_stages(s, run_id=run_id)

    def update_stage(self, run_id: str, name: str, **fields: Any) -> None:
        with self.session() as s:
            crud.update_stage(s, run_id=run_id, name=name, **fields)

    def update_stages_live(self, rows: Sequence[LiveRow]) -> None:
        """Many running stages' live progress (step, last loss, last-step time) in one
        transaction: the watch's per-cycle write. A stage row that is gone is skipped."""
        if rows:
            with self.session() as s:
                crud.update_stages_live(s, [(r.run_id, r.stage, r.step, r.last_loss, r.last_step_at) for r in rows])

    def start_stage(self, run_id: str, name: str) -> None:
        with self.session() as s:
            crud.update_stage(s, run_id=run_id, name=name, state=StageState.RUNNING.value, started_at=self.now())
            crud.update_run(s, run=_found(crud.get_run(s, run_id=run_id), f"run {run_id!r}"), current_stage=name)

    def close_stages(self, run_id: str) -> None:
        """The driver ended: no stage row stays running. A stopped run's unfinished stages are
        stopped; a failed run's running stage failed; the rest stays as it was (pending stages
        of a run that will be resumed, e.g. needs_attention, stay pending)."""
        with self.session() as s:
            run = crud.get_run(s, run_id=run_id)
            if run is None:
                return
            final = {RunState.STOPPED: StageState.STOPPED, RunState.FAILED: StageState.FAILED}.get(RunState(run.state))
            for st in crud.list_stages(s, run_id=run_id):
                if final is not None and StageState(st.state) not in FINAL_STAGE_STATES:
                    crud.update_stage(s, stage=st, state=final.value, finished_at=self.now())

    # ---- incidents ---------------------------------------------------------------------------
    def incident(self, incident_id: int) -> Incident | None:
        with self.session() as s:
            return crud.get_incident(s, incident_id=incident_id)

    def update_incident(self, incident_id: int, **fields: Any) -> None:
        with self.session() as s:
            inc = _found(crud.get_incident(s, incident_id=incident_id), f"incident {incident_id}")
            crud.update_incident(s, incident=inc, **jsonable(fields))

    def create_incident(self, **fields: Any) -> tuple[Incident, bool]:
        """(incident, created): an existing one with the same dedup key is returned, not doubled."""
        with self.session() as s:
            return crud.create_incident(s, **jsonable(fields))

    def stage_incidents(self, run_id: str, stage: str, *, open_only: bool = False) -> list[Incident]:
        with self.session() as s:
            return [i for i in crud.list_incidents(s, run_id=run_id, open_only=open_only) if i.stage_name == stage]

    def add_fingerprint(self, incident_id: int, fingerprint: str | None) -> None:
        if not fingerprint:
            return
        with self.session() as s:
            inc = crud.get_incident(s, incident_id=incident_id)
            if inc is not None and fingerprint not in (inc.alert_fingerprints or []):
                crud.update_incident(s, incident=inc, alert_fingerprints=[*(inc.alert_fingerprints or []), fingerprint])

    def attempts(self, run_id: str, stage: str, *, exclude: int | None = None) -> list[Attempt]:
        """The stage's recoveries so far (rollbacks and restarts), oldest first, as the policy sees them."""
        return [Attempt(kind=i.kind, onset_step=i.onset_step or 0, action=i.action,
                        checkpoint_step=i.rollback_to_step, lr_multiplier=float(i.lr_multiplier or 1.0),
                        skip=[(int(a), int(b)) for a, b in (i.skip or [])])
                for i in sorted(self.stage_incidents(run_id, stage), key=lambda i: i.id or 0)
                if i.id != exclude and i.action in ("rollback", "restart")]

    def close_open_incidents(self, run_id: str, *, outcome: str, reason: str, action: str | None = None) -> None:
        with self.session() as s:
            for inc in crud.list_incidents(s, run_id=run_id, open_only=True):
                fields: dict[str, Any] = {"outcome": outcome, "resolved_at": self.now(),
                                          "evidence": {**(inc.evidence or {}), "closed": reason}}
                if action is not None:
                    fields["action"] = inc.action or action
                crud.update_incident(s, incident=inc, **fields)

    def resolve_alert(self, run_id: str, fingerprint: str) -> int:
        """Open alert incidents carrying `fingerprint` are resolved (the alert ended by itself)."""
        n = 0
        with self.session() as s:
            for inc in crud.list_incidents(s, run_id=run_id, open_only=True):
                if inc.source == "alert" and fingerprint in (inc.alert_fingerprints or []) and inc.outcome == "open":
                    crud.update_incident(s, incident=inc, outcome="resolved", resolved_at=self.now())
                    n += 1
        return n

    # ---- proposals (approve / observe modes) -------------------------------------------------
    def create_proposal(self, run_id: str, **fields: Any) -> Proposal:
        with self.session() as s:
            return crud.create_proposal(s, run_id=run_id, **jsonable(fields))

    def proposal(self, run_id: str, proposal_id: int) -> Proposal:
        with self.session() as s:
            prop = crud.get_proposal(s, run_id=run_id, proposal_id=proposal_id)
        return _found(prop, f"proposal {proposal_id} of run {run_id!r}")

    def update_proposal(self, run_id: str, proposal_id: int, **fields: Any) -> Proposal:
        with self.session() as s:
            prop = _found(crud.get_proposal(s, run_id=run_id, proposal_id=proposal_id), f"proposal {proposal_id}")
            return crud.update_proposal(s, proposal=prop, **jsonable(fields))

    def waiting_proposals(self, run_id: str, stage: str | None = None) -> list[Proposal]:
        with self.session() as s:
            return crud.list_proposals(s, run_id=run_id, state="proposed", stage_name=stage)

    def due_proposals(self) -> list[Proposal]:
        with self.session() as s:
            return crud.due_proposals(s, now=self.now())

    # ---- checkpoints -------------------------------------------------------------------------
    def register_checkpoint(self, run_id: str, stage: str, report: CheckpointReport) -> None:
        with self.session() as s:
            crud.upsert_checkpoint(
                s, run_id=run_id, stage_name=stage, step=report.step, batch_cursor=report.batch_cursor,
                path=report.ref.path, verified=True, healthy=report.healthy, metrics=dict(report.metrics),
                tags=list(report.tags), files=report.ref.to_dict()["files"])

    def checkpoint(self, run_id: str, checkpoint_id: int) -> Checkpoint | None:
        with self.session() as s:
            return crud.get_checkpoint(s, run_id=run_id, checkpoint_id=checkpoint_id)

    def find_checkpoint(self, run_id: str, path: str, stage: str | None = None) -> Checkpoint | None:
        with self.session() as s:
            return crud.find_checkpoint(s, run_id=run_id, path=path, stage_name=stage)

    def checkpoints(self, run_id: str, stage: str | None = None, *, good_only: bool = False) -> list[Checkpoint]:
        """The run's (stage's) existing checkpoints that carry recorded hashes, oldest first."""
        with self.session() as s:
            return [c for c in crud.list_checkpoints(s, run_id=run_id, stage_name=stage, good_only=good_only,
                                                     include_deleted=False) if c.files]

    def checkpoint_infos(self, run_id: str, stage: str) -> list[CheckpointInfo]:
        """The stage's existing checkpoints as the policy sees them."""
        with self.session() as s:
            rows = crud.list_checkpoints(s, run_id=run_id, stage_name=stage, include_deleted=False)
        return [CheckpointInfo(
            step=c.step, batch_cursor=c.batch_cursor, verified=bool(c.verified and not c.bad_reason and c.files),
            healthy=bool(c.healthy), anomalies_in_window=int((c.metrics or {}).get("anomalies_in_window", 0) or 0),
            metrics={k: float(v) for k, v in (c.metrics or {}).items()
                     if isinstance(v, (int, float)) and k != "anomalies_in_window"},
            lr_multiplier=float((c.metrics or {}).get("lr_multiplier", 1.0) or 1.0), ref=c.path,
        ) for c in rows]

    def mark_checkpoint_gone(self, row: Checkpoint) -> None:
        """Deleted (retention, a rollback), unless a new report replaced its recorded files meanwhile."""
        with self.session() as s:
            cur = crud.get_checkpoint(s, run_id=row.run_id, checkpoint_id=row_id(row))
            if cur is not None and cur.files == row.files:
                crud.mark_checkpoint_deleted(s, checkpoint=cur)

    def quarantine_checkpoint(self, row: Checkpoint, reason: str) -> bool:
        """Mark a corrupt checkpoint bad with a `checkpoint_corrupt` incident, once (the dedup key
        decides). False when it was already bad or its recorded files changed meanwhile.
        Takes no run lock: it runs under the catalog's lock, which a decision takes while it
        holds the run lock (the other order deadlocked once)."""
        with self.session() as s:
            cur = crud.get_checkpoint(s, run_id=row.run_id, checkpoint_id=row_id(row))
            if cur is None or cur.bad_reason or cur.files != row.files:
                return False
            crud.mark_checkpoint_bad(s, checkpoint=cur, reason=reason)
            inc, created = crud.create_incident(
                s, run_id=row.run_id, stage_name=row.stage_name, kind="checkpoint_corrupt", onset_step=cur.step,
                detected_at_step=cur.step, source="watch", evidence={"path": cur.path, "error": reason},
                dedup_key=f"{row.run_id}:{row.stage_name}:checkpoint_corrupt:{cur.id}",
            )
            if created:
                crud.update_incident(s, incident=inc, action="quarantine", outcome="resolved",
                                     resolved_at=self.now(), recovery_seconds=0.0)
        return created

    @staticmethod
    def ref_of(row: Checkpoint) -> CheckpointRef:
        return CheckpointRef(row.path, dict(row.files))


T = TypeVar("T")


def _found(row: T | None, what: str) -> T:
    if row is None:
        raise errors.NotFound(f"{what} not found")
    return row


def row_id(row: Checkpoint | Incident) -> int:
    """The id of a stored row (assigned once it was saved)."""
    if row.id is None:
        raise ValueError(f"{type(row).__name__} was never saved")
    return row.id


def finite(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))


def jsonable(obj: Any) -> Any:
    """Evidence goes into JSON columns: NaN/inf become strings, tuples lists, enums their values."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not finite(obj):
        return str(obj)
    if hasattr(obj, "value") and hasattr(obj, "name"):  # enums
        return obj.value
    return obj
