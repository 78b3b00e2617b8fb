"""A worker group's one state from its ranks' (pure: no Ray needed to force an interleaving)."""
from __future__ import annotations

import time
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


def test_the_warm_pool_replaces_spares_taken_after_its_delay_once(monkeypatch):
    """A taken spare's replacement starts `refill_delay_s` later (its start-up would take CPU
    from the group starting right then), once however many takes came meanwhile."""
    import threading

    from trainguard.workers.group import WarmPool

    pool = WarmPool(2, refill_delay_s=0.3)
    calls: list[float] = []
    done = threading.Event()

    def refill() -> None:
        calls.append(time.monotonic())
        done.set()

    monkeypatch.setattr(pool, "refill", refill)
    monkeypatch.setattr("trainguard.workers.group.ray.is_initialized", lambda: True)
    t0 = time.monotonic()
    pool.refill_later()
    pool.refill_later()
    assert calls == []  # not at once
    assert done.wait(10)
    time.sleep(0.4)  # a second timer would have fired by now
    assert len(calls) == 1 and calls[0] - t0 >= 0.3
    pool.refill_delay_s = 0
    pool.refill_later()
    assert len(calls) == 2  # no delay: at once


def test_closing_the_warm_pool_cancels_a_pending_refill(monkeypatch):
    from trainguard.workers.group import WarmPool

    pool = WarmPool(2, refill_delay_s=0.2)
    calls: list[int] = []
    monkeypatch.setattr(pool, "refill", lambda: calls.append(1))
    monkeypatch.setattr("trainguard.workers.group.ray.is_initialized", lambda: True)
    pool.refill_later()
    pool.close()
    time.sleep(0.5)
    assert calls == []
