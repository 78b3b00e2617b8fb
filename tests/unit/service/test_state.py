"""Run state machine, stage states, and the state sets other modules use."""
from __future__ import annotations

import itertools

import pytest

from trainguard.service.domain.state import (
    ACTIVE_RUN_STATES,
    FINAL_STAGE_STATES,
    TERMINAL_RUN_STATES,
    TRANSITIONS,
    InvalidTransition,
    RunState,
    StageState,
    transition_to,
)

LEGAL = [
    ("pending", "running"),
    ("pending", "paused"),
    ("pending", "stopped"),
    ("running", "paused"),
    ("paused", "running"),
    ("running", "recovering"),
    ("recovering", "running"),
    ("recovering", "paused"),
    ("recovering", "needs_attention"),
    ("running", "needs_attention"),
    ("needs_attention", "running"),
    ("needs_attention", "recovering"),
    ("paused", "recovering"),
    ("paused", "completed"),
    ("running", "completed"),
    ("running", "failed"),
    ("running", "stopped"),
    ("paused", "stopped"),
]


@pytest.mark.parametrize("cur, target", LEGAL)
def test_legal_transitions(cur, target):
    assert transition_to(cur, target) is RunState(target)
    assert transition_to(RunState(cur), RunState(target)) is RunState(target)


@pytest.mark.parametrize("cur, target", [("pending", "recovering"), ("pending", "needs_attention"), ("pending", "completed"),
                                         ("needs_attention", "paused"), ("needs_attention", "completed"),
                                         ("running", "pending"), ("paused", "paused")])
def test_illegal_transitions_raise(cur, target):
    with pytest.raises(InvalidTransition, match=f"cannot move a run to {target} when it is {cur} \\(allowed: "):
        transition_to(cur, target)


@pytest.mark.parametrize("state, target", list(itertools.product(["completed", "failed", "stopped"], [s.value for s in RunState])))
def test_terminal_states_accept_nothing(state, target):
    with pytest.raises(InvalidTransition, match="finished"):
        transition_to(state, target)


def test_invalid_transition_is_a_value_error():
    assert issubclass(InvalidTransition, ValueError)


def test_unknown_states_are_value_errors():
    with pytest.raises(ValueError, match="unknown run state"):
        transition_to("exploding", "running")
    with pytest.raises(ValueError, match="unknown run state"):
        transition_to("running", "exploded")


def test_attributes():
    assert {s.value for s in RunState if s.is_terminal} == {"completed", "failed", "stopped"}
    assert {s.value for s in RunState if s.is_training} == {"running", "recovering"}
    assert RunState.RUNNING == "running" and str(RunState.PAUSED) == "paused"
    assert StageState.SKIPPED == "skipped" and str(StageState.RUNNING) == "running"


def test_every_state_has_a_row_and_non_terminal_states_can_stop_or_fail():
    assert set(TRANSITIONS) == set(RunState)
    for s in RunState:
        if not s.is_terminal:
            assert {RunState.FAILED, RunState.STOPPED} <= TRANSITIONS[s]


def test_every_run_state_is_active_terminal_or_waiting_for_an_operator():
    assert TERMINAL_RUN_STATES == {"completed", "failed", "stopped"}
    assert ACTIVE_RUN_STATES == {"pending", "running", "paused", "recovering"}
    assert not ACTIVE_RUN_STATES & TERMINAL_RUN_STATES
    assert set(RunState) - ACTIVE_RUN_STATES - TERMINAL_RUN_STATES == {RunState.NEEDS_ATTENTION}
    assert {s for s in RunState if s.is_training} <= ACTIVE_RUN_STATES


def test_final_stage_states_are_the_ends_of_a_stage():
    assert FINAL_STAGE_STATES == {"completed", "failed", "stopped", "skipped"}
    assert StageState.PENDING not in FINAL_STAGE_STATES and StageState.RUNNING not in FINAL_STAGE_STATES
    # a stopped or failed run's stage ends in the state of the same name
    assert {RunState.STOPPED.value, RunState.FAILED.value} <= {s.value for s in FINAL_STAGE_STATES}


def test_the_states_the_store_accepts_are_exactly_the_enums():
    """The store validates states against its own lists (db.models); they must not drift."""
    from trainguard.service.db.models import RUN_STATES, STAGE_STATES

    assert set(RUN_STATES) == {s.value for s in RunState}
    assert set(STAGE_STATES) == {s.value for s in StageState}


def test_the_run_state_metric_covers_every_state():
    from trainguard.service.telemetry import RUN_STATES

    assert set(RUN_STATES) == {s.value for s in RunState}
