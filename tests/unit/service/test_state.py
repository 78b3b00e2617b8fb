"""Run state machine."""
from __future__ import annotations

import itertools

import pytest

from trainguard.service.domain.state import TRANSITIONS, InvalidTransition, RunEvent, RunState, transition, transition_to

LEGAL = [
    ("pending", "start", "running"),
    ("running", "pause", "paused"),
    ("paused", "resume", "running"),
    ("running", "recover", "recovering"),
    ("recovering", "recovered", "running"),
    ("recovering", "attention", "needs_attention"),
    ("running", "attention", "needs_attention"),
    ("needs_attention", "resume", "running"),
    ("needs_attention", "recover", "recovering"),
    ("paused", "recover", "recovering"),
    ("running", "complete", "completed"),
    ("running", "fail", "failed"),
    ("running", "stop", "stopped"),
    ("paused", "stop", "stopped"),
    ("pending", "stop", "stopped"),
]


@pytest.mark.parametrize("cur, event, nxt", LEGAL)
def test_legal_transitions(cur, event, nxt):
    assert transition(cur, event) is RunState(nxt)
    assert transition(RunState(cur), RunEvent(event)) is RunState(nxt)


@pytest.mark.parametrize("cur, event", [("pending", "resume"), ("paused", "pause"), ("running", "start"), ("recovering", "resume"), ("running", "recovered")])
def test_illegal_transitions_raise(cur, event):
    with pytest.raises(InvalidTransition, match=f"cannot {event} a run that is {cur}"):
        transition(cur, event)


@pytest.mark.parametrize("state, event", list(itertools.product(["completed", "failed", "stopped"], [e.value for e in RunEvent])))
def test_terminal_states_accept_nothing(state, event):
    with pytest.raises(InvalidTransition, match="finished"):
        transition(state, event)


def test_invalid_transition_is_a_value_error():
    assert issubclass(InvalidTransition, ValueError)


def test_unknown_names_are_value_errors():
    with pytest.raises(ValueError, match="unknown run state"):
        transition("exploding", "start")
    with pytest.raises(ValueError, match="unknown run event"):
        transition("running", "explode")


def test_attributes():
    assert {s.value for s in RunState if s.is_terminal} == {"completed", "failed", "stopped"}
    assert {s.value for s in RunState if s.is_active} == {"running", "recovering"}
    assert RunState.RUNNING == "running" and str(RunState.PAUSED) == "paused"


def test_every_state_has_a_row_and_non_terminal_states_can_stop_or_fail():
    assert set(TRANSITIONS) == set(RunState)
    for s in RunState:
        if not s.is_terminal:
            assert TRANSITIONS[s][RunEvent.FAIL] is RunState.FAILED
            assert TRANSITIONS[s][RunEvent.STOP] is RunState.STOPPED


@pytest.mark.parametrize("cur, target", [("pending", "running"), ("running", "recovering"), ("recovering", "running"),
                                         ("needs_attention", "running"), ("pending", "paused"), ("recovering", "paused")])
def test_transition_to_target_state(cur, target):
    assert transition_to(cur, target) is RunState(target)


@pytest.mark.parametrize("cur, target", [("completed", "running"), ("pending", "recovering"), ("stopped", "stopped")])
def test_transition_to_illegal_target_raises(cur, target):
    with pytest.raises(InvalidTransition, match=f"cannot move a run to {target}"):
        transition_to(cur, target)
