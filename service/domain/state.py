"""Run and stage states: the run's state machine (states that carry their attributes, one
transition function) and the states a pipeline stage goes through.

The controller persists every run transition and exports it as trainguard_run_state. Both
enums are `str` enums: a member equals the string stored in the database and sent by the API
(`RunState.RUNNING == "running"`), so they can be written and compared as they are.
"""
from __future__ import annotations

import enum

__all__ = [
    "RunState",
    "StageState",
    "InvalidTransition",
    "transition_to",
    "TRANSITIONS",
    "ACTIVE_RUN_STATES",
    "TERMINAL_RUN_STATES",
    "FINAL_STAGE_STATES",
]


class RunState(str, enum.Enum):
    """A run's state; `is_terminal` and `is_training` say what it means for the supervisor."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    RECOVERING = "recovering"
    NEEDS_ATTENTION = "needs_attention"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def is_terminal(self) -> bool:
        """Nothing more happens to the run."""
        return self in TERMINAL_RUN_STATES

    @property
    def is_training(self) -> bool:
        """Workers are (or are being brought back) training, so the watch loop runs the detectors on it."""
        return self is RunState.RUNNING or self is RunState.RECOVERING

    def __str__(self) -> str:
        return str(self.value)


class StageState(str, enum.Enum):
    """A pipeline stage's state in the store. A stage starts pending, runs, and ends completed,
    or stopped / failed with its run; a pause or a recovery shows on the run, not the stage."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"  # accepted by the store; no code writes it today
    RECOVERING = "recovering"  # accepted by the store; no code writes it today
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"
    SKIPPED = "skipped"  # accepted by the store; no code writes it today

    def __str__(self) -> str:
        return str(self.value)


ACTIVE_RUN_STATES: frozenset[RunState] = frozenset(
    {RunState.PENDING, RunState.RUNNING, RunState.PAUSED, RunState.RECOVERING}
)
"""Runs with a driver: the supervisor picks them up again when it restarts. A run that needs
attention waits for an operator instead, and a terminal one is done."""

TERMINAL_RUN_STATES: frozenset[RunState] = frozenset({RunState.COMPLETED, RunState.FAILED, RunState.STOPPED})
"""Nothing more happens to the run (`RunState.is_terminal`)."""

FINAL_STAGE_STATES: frozenset[StageState] = frozenset(
    {StageState.COMPLETED, StageState.FAILED, StageState.STOPPED, StageState.SKIPPED}
)
"""Stages that will not run again in this run (the rest are still to run, or running)."""


class InvalidTransition(ValueError):
    """A target state that is not reachable in one move from the run's current state."""

    def __init__(self, current: RunState, target: RunState) -> None:
        allowed = sorted(s.value for s in TRANSITIONS.get(current, ()))
        super().__init__(
            f"cannot move a run to {target.value} when it is {current.value}"
            + (f" (allowed: {', '.join(allowed)})" if allowed else " (it is finished)")
        )
        self.current = current
        self.target = target


S = RunState
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    # started; paused, stopped or failed before it started
    S.PENDING: frozenset({S.RUNNING, S.PAUSED, S.STOPPED, S.FAILED}),
    # recovering: a rollback / restart begins (automatic or an operator's); needs_attention:
    # the policy gave up (pause and alert an operator)
    S.RUNNING: frozenset({S.PAUSED, S.STOPPED, S.RECOVERING, S.NEEDS_ATTENTION, S.COMPLETED, S.FAILED}),
    # A run can finish while a pause or a recovery is being applied (the last step raced it).
    S.PAUSED: frozenset({S.RUNNING, S.STOPPED, S.RECOVERING, S.NEEDS_ATTENTION, S.COMPLETED, S.FAILED}),
    # running: the workers run again from the recovery point
    S.RECOVERING: frozenset({S.RUNNING, S.PAUSED, S.NEEDS_ATTENTION, S.COMPLETED, S.STOPPED, S.FAILED}),
    # An operator resumes as is, or rolls back (recovering), or gives up (stopped).
    S.NEEDS_ATTENTION: frozenset({S.RUNNING, S.RECOVERING, S.STOPPED, S.FAILED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.STOPPED: frozenset(),
}
"""The states a run may move to in one step from each state."""
del S


def _state(value: RunState | str) -> RunState:
    try:
        return RunState(value)
    except ValueError:
        raise ValueError(f"unknown run state {value!r} (known: {', '.join(s.value for s in RunState)})") from None


def transition_to(current: RunState | str, target: RunState | str) -> RunState:
    """`target` (as a RunState) when a run may move there from `current` in one step; raises
    InvalidTransition (a ValueError) otherwise. Strings are accepted for both (the values
    stored in the database)."""
    cur, tgt = _state(current), _state(target)
    if tgt not in TRANSITIONS[cur]:
        raise InvalidTransition(cur, tgt)
    return tgt
