"""Pure supervisor logic: detectors, recovery policy, run and stage states.

No I/O and no fastapi/ray/sqlmodel/httpx/torch imports here (standard library only),
so every decision can be unit-tested on plain data.
"""
from trainguard.service.domain.detectors import Finding, IncidentKind
from trainguard.service.domain.policy import Action, Attempt, CheckpointInfo, Decision, RecoveryConfig, RunSnapshot, decide, dedup_key
from trainguard.service.domain.series import Sample, Window
from trainguard.service.domain.state import (
    ACTIVE_RUN_STATES,
    FINAL_STAGE_STATES,
    TERMINAL_RUN_STATES,
    InvalidTransition,
    RunState,
    StageState,
    transition_to,
)

__all__ = [
    "ACTIVE_RUN_STATES",
    "FINAL_STAGE_STATES",
    "TERMINAL_RUN_STATES",
    "Action",
    "Attempt",
    "CheckpointInfo",
    "Decision",
    "Finding",
    "IncidentKind",
    "InvalidTransition",
    "RecoveryConfig",
    "RunSnapshot",
    "RunState",
    "Sample",
    "StageState",
    "Window",
    "decide",
    "dedup_key",
    "transition_to",
]
