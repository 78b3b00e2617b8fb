"""Request and response bodies that are not table shapes (those live in service/db/models.py)."""
from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AnnealRequest",
    "RollbackRequest",
    "RollbackAccepted",
    "ProposalDecision",
    "Alert",
    "AlertmanagerPayload",
    "AlertsResult",
    "ErrorBody",
    "ValidationIssue",
    "MAX_DB_INT",
]

# Ids and offsets reach SQL as integers: PostgreSQL's INTEGER ends here (2**63 made a 500).
MAX_DB_INT = 2**31 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class AnnealRequest(_Body):
    """Switch the running stage to a decaying LR (and optionally a new data mixture)."""

    steps: int = Field(ge=1, le=1_000_000, description="optimizer steps the anneal lasts")
    final_lr: float = Field(ge=0.0, le=1.0, description="learning rate reached at the end")
    schedule: Literal["linear", "cosine", "exponential"] = "linear"
    mixture: dict[str, float] | None = Field(None, description="source -> weight (relative); default: unchanged")

    @field_validator("mixture")
    @classmethod
    def _mixture(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("mixture must name at least one source")
        for k, w in v.items():
            if not math.isfinite(w) or w < 0 or w > 1e6:
                raise ValueError(f"mixture weight for {k!r} must be between 0 and 1e6 (got {w})")
        if sum(v.values()) <= 0:
            raise ValueError("mixture weights sum to zero")
        return v

    def unknown_sources(self, known: set[str]) -> list[str]:
        return sorted(set(self.mixture or {}) - known)


class RollbackRequest(_Body):
    checkpoint_id: int | None = Field(
        None, ge=1, le=MAX_DB_INT, description="default: the newest good checkpoint before the last incident"
    )
    skip: bool = Field(True, description="skip the batches trained on since the checkpoint (never train on them again)")
    lr_multiplier: float | None = Field(
        None, gt=0.0, le=1.0, description="multiply the learning rate by this; default: the recovery policy's backoff"
    )


class ProposalDecision(_Body):
    """Body of POST /runs/{id}/proposals/{pid}/approve|reject (optional)."""

    note: str | None = Field(None, max_length=500, description="why; kept with the proposal and in the event log")


class RollbackAccepted(BaseModel):
    model_config = ConfigDict(extra="allow")

    run_id: str
    incident_id: int | None = None
    target_step: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        # The controller may name them after the Incident columns; both spellings are answered.
        if isinstance(data, dict):
            data = dict(data)
            if "incident_id" not in data and "incident" in data:
                data["incident_id"] = data["incident"]
            if "target_step" not in data and "rollback_to_step" in data:
                data["target_step"] = data["rollback_to_step"]
        return data


class Alert(BaseModel):
    """One alert of an Alertmanager webhook (payload version 4)."""

    model_config = ConfigDict(extra="ignore")

    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: datetime
    endsAt: datetime | None = None  # "0001-01-01T00:00:00Z" while firing
    generatorURL: str = ""
    fingerprint: str = Field(min_length=1)


class AlertmanagerPayload(BaseModel):
    """https://prometheus.io/docs/alerting/latest/configuration/#webhook_config"""

    model_config = ConfigDict(extra="ignore")

    version: Literal["4"]
    groupKey: str
    truncatedAlerts: int = 0
    status: Literal["firing", "resolved"]
    receiver: str
    groupLabels: dict[str, str] = Field(default_factory=dict)
    commonLabels: dict[str, str] = Field(default_factory=dict)
    commonAnnotations: dict[str, str] = Field(default_factory=dict)
    externalURL: str = ""
    alerts: list[Alert]


class AlertsResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    created: int = 0
    merged: int = 0
    resolved: int = 0
    ignored: int = 0


class ValidationIssue(BaseModel):
    """One problem of a 422: where (`loc`, e.g. ["body", "steps"]), what, and pydantic's error type."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every error answer: `detail` says what is wrong and names the field; a 422 from request
    validation also lists the problems in `errors` (at most 20)."""

    detail: str
    errors: list[ValidationIssue] | None = None
