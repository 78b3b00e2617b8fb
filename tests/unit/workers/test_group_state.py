"""A worker group's one state from its ranks' (pure: no Ray needed to force an interleaving)."""
from __future__ import annotations

import pytest

from trainguard.workers.group import group_state


def _rank(state: str, *, returned: bool, alive: bool = True) -> dict:
    return {"state": state, "returned": returned, "alive": alive}


def test_a_rank_whose_status_says_finished_before_run_returned_keeps_the_group_running():
    """The race that gave finished stages a null output checkpoint: rank 0's harness reports
    "finished" a moment before its run() returns the result that carries the output."""
    late = [_rank("finished", returned=False), _rank("finished", returned=True)]
    assert group_state(late) == "running"
    assert group_state([_rank("finished", returned=True), _rank("finished", returned=True)]) == "finished"


@pytest.mark.parametrize("ranks, want", [
    ([_rank("stopped", returned=False), _rank("stopped", returned=True)], "running"),
    ([_rank("stopped", returned=True), _rank("finished", returned=True)], "stopped"),
    ([_rank("running", returned=False), _rank("failed", returned=True)], "failed"),
    ([_rank("running", returned=False), _rank("running", returned=False, alive=False)], "failed"),
    ([_rank("paused", returned=False), _rank("running", returned=False)], "paused"),
])
def test_group_state(ranks, want):
    assert group_state(ranks) == want
