"""Run state machine: states that carry their attributes, one transition function.

The controller persists every transition and exports it as trainguard_run_state.
"""
from __future__ import annotations

import enum

__all__ = ["RunState", "RunEvent", "InvalidTransition", "transition", "transition_to", "TRANSITIONS"]


class RunState(str, enum.Enum):
    """`is_terminal`: nothing more happens to the run. `is_active`: workers are (or are being
    brought back) training, so the watch loop runs the detectors on it."""

    PENDING = ("pending", False, False)
    RUNNING = ("running", False, True)
    PAUSED = ("paused", False, False)
    RECOVERING = ("recovering", False, True)
    NEEDS_ATTENTION = ("needs_attention", False, False)
    COMPLETED = ("completed", True, False)
    FAILED = ("failed", True, False)
    STOPPED = ("stopped", True, False)

    def __new__(cls, value: str, is_terminal: bool, is_active: bool) -> "RunState":
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.is_terminal = is_terminal  # type: ignore[attr-defined]
        obj.is_active = is_active  # type: ignore[attr-defined]
        return obj

    is_terminal: bool
    is_active: bool

    def __str__(self) -> str:
        return self.value


class RunEvent(str, enum.Enum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    RECOVER = "recover"  # a rollback / restart begins (automatic or an operator's)
    RECOVERED = "recovered"  # the workers run again from the recovery point
    ATTENTION = "attention"  # the policy gave up: pause and alert an operator
    COMPLETE = "complete"
    FAIL = "fail"

    def __str__(self) -> str:
        return self.value


class InvalidTransition(ValueError):
    """An event (or a target state) that is not allowed in the run's current state."""

    def __init__(self, current: RunState, event: RunEvent | None = None, target: RunState | None = None) -> None:
        allowed = sorted(e.value for e in TRANSITIONS.get(current, {}))
        what = f"{event.value} a run" if event is not None else f"move a run to {target.value if target else '?'} when it"
        super().__init__(
            f"cannot {what} that is {current.value}" + (f" (allowed: {', '.join(allowed)})" if allowed else " (it is finished)")
        )
        self.current = current
        self.event = event
        self.target = target


S, E = RunState, RunEvent
TRANSITIONS: dict[RunState, dict[RunEvent, RunState]] = {
    S.PENDING: {E.START: S.RUNNING, E.PAUSE: S.PAUSED, E.STOP: S.STOPPED, E.FAIL: S.FAILED},
    S.RUNNING: {
        E.PAUSE: S.PAUSED,
        E.STOP: S.STOPPED,
        E.RECOVER: S.RECOVERING,
        E.ATTENTION: S.NEEDS_ATTENTION,
        E.COMPLETE: S.COMPLETED,
        E.FAIL: S.FAILED,
    },
    # A run can finish while a pause or a recovery is being applied (the last step raced it).
    S.PAUSED: {
        E.RESUME: S.RUNNING,
        E.STOP: S.STOPPED,
        E.RECOVER: S.RECOVERING,
        E.ATTENTION: S.NEEDS_ATTENTION,
        E.COMPLETE: S.COMPLETED,
        E.FAIL: S.FAILED,
    },
    S.RECOVERING: {
        E.RECOVERED: S.RUNNING,
        E.PAUSE: S.PAUSED,
        E.ATTENTION: S.NEEDS_ATTENTION,
        E.COMPLETE: S.COMPLETED,
        E.STOP: S.STOPPED,
        E.FAIL: S.FAILED,
    },
    # An operator resumes as is, or rolls back (recover), or gives up (stop).
    S.NEEDS_ATTENTION: {E.RESUME: S.RUNNING, E.RECOVER: S.RECOVERING, E.STOP: S.STOPPED, E.FAIL: S.FAILED},
    S.COMPLETED: {},
    S.FAILED: {},
    S.STOPPED: {},
}
del S, E


def _state(value: RunState | str) -> RunState:
    try:
        return RunState(value)
    except ValueError:
        raise ValueError(f"unknown run state {value!r} (known: {', '.join(s.value for s in RunState)})") from None


def transition(current: RunState | str, event: RunEvent | str) -> RunState:
    """The state after `event`; raises InvalidTransition (a ValueError) when it is not allowed.
    Strings are accepted for both (the values stored in the database / sent by the API)."""
    cur = _state(current)
    try:
        ev = RunEvent(event)
    except ValueError:
        raise ValueError(f"unknown run event {event!r} (known: {', '.join(e.value for e in RunEvent)})") from None
    nxt = TRANSITIONS[cur].get(ev)
    if nxt is None:
        raise InvalidTransition(cur, ev)
    return nxt


def transition_to(current: RunState | str, target: RunState | str) -> RunState:
    """`target` when some event leads there from `current` in one move; raises
    InvalidTransition otherwise (for callers that record states rather than events)."""
    cur, tgt = _state(current), _state(target)
    if tgt not in TRANSITIONS[cur].values():
        raise InvalidTransition(cur, target=tgt)
    return tgt
