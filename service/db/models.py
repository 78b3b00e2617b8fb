"""SQLModel tables and their API shapes (FastAPI-template families: Base / Public / table).

Times are stored timezone-aware and always read back as UTC (SQLite drops the
offset; `UTCDateTime` puts it back). JSON columns are replaced, never mutated in
place, so SQLAlchemy sees every change.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import ConfigDict, field_validator
from sqlmodel import JSON, Field, SQLModel

from trainguard.service.domain.proposal import PROPOSAL_STATES, RECOVERY_MODES
from trainguard.service.domain.state import RunState, StageState

__all__ = [
    "RUN_STATES",
    "STAGE_STATES",
    "INCIDENT_SOURCES",
    "INCIDENT_OUTCOMES",
    "OPEN_OUTCOMES",
    "RUN_ID_PATTERN",
    "utcnow",
    "UTCDateTime",
    "RunBase",
    "Run",
    "RunPublic",
    "RunCreate",
    "RunStageBase",
    "RunStage",
    "RunStagePublic",
    "RunDetailPublic",
    "RunsPublic",
    "CheckpointBase",
    "Checkpoint",
    "CheckpointPublic",
    "CheckpointsPublic",
    "IncidentBase",
    "Incident",
    "IncidentPublic",
    "IncidentsPublic",
    "EventBase",
    "Event",
    "EventPublic",
    "EventsPublic",
    "RECOVERY_MODES",
    "PROPOSAL_STATES",
    "ProposalBase",
    "Proposal",
    "ProposalPublic",
    "ProposalsPublic",
]

RUN_STATES = tuple(s.value for s in RunState)
STAGE_STATES = tuple(s.value for s in StageState)
INCIDENT_SOURCES = ("watch", "alert", "operator")
# observed: observe mode proposed a recovery and, by design, did nothing
INCIDENT_OUTCOMES = ("open", "recovering", "resolved", "needs_attention", "failed", "ignored", "observed")
OPEN_OUTCOMES = ("open", "recovering")
RUN_ID_PATTERN = r"^run-[0-9a-f]{12}$"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(sa.TypeDecorator):
    """DateTime(timezone=True) that never returns a naive value."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware UTC time")
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


# --- runs -----------------------------------------------------------------------------


class RunBase(SQLModel):
    name: str
    state: str = "pending"
    current_stage: str | None = None
    lr_multiplier: float = 1.0
    goodput: float | None = None
    error: str | None = None
    recovery_mode: str = "auto"  # auto | approve | observe (service/domain/proposal.py)


class Run(RunBase, table=True):
    __tablename__ = "run"
    # GET /runs: a page newest first, optionally of one state (migration 0004)
    __table_args__ = (
        sa.Index("ix_run_created_at_id", "created_at", "id"),
        sa.Index("ix_run_state_created_at_id", "state", "created_at", "id"),
    )

    id: str = Field(primary_key=True)
    spec: str = Field(sa_type=sa.Text)  # the validated PipelineSpec as JSON text
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class RunCreate(SQLModel):
    """POST /runs body: exactly one of a pipeline mapping or its YAML text."""

    model_config = ConfigDict(extra="forbid")

    spec: dict[str, Any] | None = None
    yaml: str | None = None
    recovery_mode: Literal["auto", "approve", "observe"] | None = None
    """auto: recover on its own; approve: propose, act once an operator approves; observe:
    propose, never act. Default: the deployment's TRAINGUARD_RECOVERY_MODE."""


class RunPublic(RunBase):
    id: str
    spec: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @field_validator("spec", mode="before")
    @classmethod
    def _spec_from_text(cls, v: Any) -> Any:
        return json.loads(v) if isinstance(v, str) else v


class RunsPublic(SQLModel):
    data: list[RunPublic]
    count: int


RUN_LIST_VERSION_ID = 1  # the one row of run_list_version


class RunListVersion(SQLModel, table=True):
    """One row: a version of the `run` table, for GET /runs' page cache (service/api/routes/runs.py).

    Database triggers (migration 0005; SQLite and PostgreSQL) add 1 to `version` in the same
    transaction as every INSERT, UPDATE or DELETE on `run`, whoever makes it (any process, any
    code path, hand-written SQL), so a reader that sees a version also sees every run write
    committed before it. `epoch` is random, set when the row is created: a store rebuilt under a
    running API (downgrade + upgrade) never repeats an (epoch, version) pair it served.

    A later migration that recreates `run` (SQLite batch mode copies the table) drops its
    triggers and must create them again; tests/integration/store/test_run_list_version.py
    fails if they are gone."""

    __tablename__ = "run_list_version"

    id: int = Field(primary_key=True)
    epoch: str
    version: int = Field(sa_type=sa.BigInteger)


# --- stages ---------------------------------------------------------------------------


class RunStageBase(SQLModel):
    index: int
    name: str
    kind: str
    state: str = "pending"
    steps: int  # target
    step: int = 0  # last seen (live while the stage runs)
    first_loss: float | None = None
    last_loss: float | None = None  # training loss at `step` (live while the stage runs)
    last_step_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # when `step` finished
    final_loss: float | None = None
    output_checkpoint: str | None = None
    restarts: int = 0
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class RunStage(RunStageBase, table=True):
    __tablename__ = "run_stage"
    __table_args__ = (
        sa.UniqueConstraint("run_id", "index", name="uq_run_stage_index"),
        sa.UniqueConstraint("run_id", "name", name="uq_run_stage_name"),
    )

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="run.id", index=True)


class RunStagePublic(RunStageBase):
    id: int
    run_id: str


class RunDetailPublic(RunPublic):
    stages: list[RunStagePublic]


# --- checkpoints ----------------------------------------------------------------------


class CheckpointBase(SQLModel):
    stage_name: str
    step: int
    batch_cursor: int
    path: str
    verified: bool = False
    healthy: bool = True
    bad_reason: str | None = None  # corrupt or unusable; never set for a checkpoint retention deleted
    deleted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # gone (retention, rollback)
    metrics: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    tags: list[str] = Field(default_factory=list, sa_type=JSON)


class Checkpoint(CheckpointBase, table=True):
    __tablename__ = "checkpoint"
    __table_args__ = (
        sa.UniqueConstraint("run_id", "stage_name", "step", "path", name="uq_checkpoint_identity"),
    )

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="run.id", index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # What the worker reported when it wrote the checkpoint: {file: {"blake3", "bytes"}} ("sha256"
    # instead of "blake3" for checkpoints written before BLAKE3; both verify). The trust
    # anchor: bytes read back are checked against these, never against the manifest in the folder.
    files: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)


class CheckpointPublic(CheckpointBase):
    id: int
    run_id: str
    created_at: datetime


class CheckpointsPublic(SQLModel):
    data: list[CheckpointPublic]
    count: int


# --- incidents ------------------------------------------------------------------------


class IncidentBase(SQLModel):
    stage_name: str | None = None
    kind: str
    onset_step: int | None = None
    detected_at_step: int | None = None
    detected_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    source: str = "watch"
    evidence: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    action: str | None = None
    rollback_to_step: int | None = None
    skip: list[list[int]] = Field(default_factory=list, sa_type=JSON)  # half-open [a, b) batch ranges
    lr_multiplier: float | None = None
    attempt: int = 1
    outcome: str = "open"
    recovery_seconds: float | None = None
    alert_fingerprints: list[str] = Field(default_factory=list, sa_type=JSON)
    resolved_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Incident(IncidentBase, table=True):
    __tablename__ = "incident"

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="run.id", index=True)
    dedup_key: str = Field(unique=True)


class IncidentPublic(IncidentBase):
    id: int
    run_id: str
    dedup_key: str


class IncidentsPublic(SQLModel):
    data: list[IncidentPublic]
    count: int


# --- events (the audit log) -------------------------------------------------------------


class EventBase(SQLModel):
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    actor: str
    kind: str
    detail: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    result: str | None = None


class Event(EventBase, table=True):
    __tablename__ = "event"

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="run.id", index=True)


class EventPublic(EventBase):
    id: int
    run_id: str


class EventsPublic(SQLModel):
    data: list[EventPublic]
    count: int


# --- recovery proposals (approve / observe modes) ---------------------------------------


class ProposalBase(SQLModel):
    """A recovery the policy decided on and the run's mode did not carry out on its own: the
    Decision field for field, what it was about, and what became of it."""

    stage_name: str
    incident_id: int | None = None
    mode: str  # the run's recovery mode when it was proposed: approve | observe
    kind: str  # the incident kind
    action: str  # rollback | restart | needs_attention
    reason: str
    checkpoint_step: int | None = None  # the target checkpoint (None: the stage's input)
    checkpoint_ref: str | None = None  # its path
    checkpoint_id: int | None = None
    skip: list[list[int]] = Field(default_factory=list, sa_type=JSON)  # half-open [a, b) batch ranges
    lr_multiplier: float = 1.0  # factor on the checkpoint's LR multiplier
    lr_target: float | None = None  # the absolute LR multiplier the run would have
    attempt: int = 0
    source: str | None = None  # budget source
    evidence: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    at_step: int | None = None  # the stage's last step when it was proposed
    state: str = "proposed"
    proposed_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    auto_apply_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # approve mode with a timeout
    decided_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    decided_by: str | None = None
    note: str | None = None  # the operator's note, or why it expired / was superseded


class Proposal(ProposalBase, table=True):
    __tablename__ = "proposal"

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="run.id", index=True)


class ProposalPublic(ProposalBase):
    id: int
    run_id: str


class ProposalsPublic(SQLModel):
    data: list[ProposalPublic]
    count: int
