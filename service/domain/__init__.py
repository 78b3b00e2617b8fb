"""Pure supervisor logic: detectors, recovery policy, run state machine.

No I/O and no fastapi/ray/sqlmodel/httpx/torch imports here (standard library only),
so every decision can be unit-tested on plain data.
"""
from trainguard.service.domain.detectors import Finding, IncidentKind
from trainguard.service.domain.policy import Action, Attempt, CheckpointInfo, Decision, RecoveryConfig, RunSnapshot, decide, dedup_key
from trainguard.service.domain.series import Sample, SeriesKey, Window
from trainguard.service.domain.state import InvalidTransition, RunEvent, RunState, transition, transition_to

__all__ = [
    "Action",
    "Attempt",
    "CheckpointInfo",
    "Decision",
    "Finding",
    "IncidentKind",
    "InvalidTransition",
    "RecoveryConfig",
    "RunEvent",
    "RunSnapshot",
    "RunState",
    "Sample",
    "SeriesKey",
    "Window",
    "decide",
    "dedup_key",
    "transition",
    "transition_to",
]
