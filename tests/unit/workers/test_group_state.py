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


def test_a_spare_warms_up_in_a_thread_of_its_own_at_the_lowest_priority():
    """The warm-up runs at nice 19 (Linux: per thread), the calling thread keeps its priority,
    and what the warm-up raised is raised to the caller."""
    import os
    import threading

    from trainguard.workers.group import _at_lowest_priority

    seen: dict[str, int] = {}

    def probe() -> None:
        seen["tid"] = threading.get_native_id()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    _at_lowest_priority(probe)
    assert seen["tid"] != threading.get_native_id() and seen["nice"] == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine

    def broken() -> None:
        raise ValueError("corpus missing")

    with pytest.raises(ValueError, match="corpus missing"):
        _at_lowest_priority(broken)


def test_spares_taken_without_a_refill_are_replaced_after_the_fallback_once(monkeypatch):
    """A taker that refills once its group is up (WorkerGroup.poll) may never poll: the pool
    refills REFILL_FALLBACK_S later, once however many takes came meanwhile; close() cancels it."""
    import threading
    import time

    import trainguard.workers.group as group_mod

    monkeypatch.setattr(group_mod, "REFILL_FALLBACK_S", 0.2)
    monkeypatch.setattr(group_mod.ray, "is_initialized", lambda: True)
    pool = group_mod.WarmPool(2)
    calls: list[float] = []
    done = threading.Event()
    monkeypatch.setattr(pool, "refill", lambda: (calls.append(time.monotonic()), done.set()))
    t0 = time.monotonic()
    pool._replace_taken(False)
    pool._replace_taken(False)
    assert calls == []  # not at once
    assert done.wait(10)
    time.sleep(0.3)  # a second timer would have fired by now
    assert len(calls) == 1 and calls[0] - t0 >= 0.2
    pool._replace_taken(True)
    assert len(calls) == 2  # at once
    pool._replace_taken(False)
    pool.close()
    time.sleep(0.4)
    assert len(calls) == 2


def test_a_group_is_up_once_every_rank_trained_a_step_after_all_were_set_up():
    from trainguard.workers.group import group_up

    def r(rank: int, state: str, step: int | None, alive: bool = True) -> dict:
        return {"rank": rank, "state": state, "step": step, "alive": alive}

    assert group_up([r(0, "running", 40), r(1, "starting", None)], None) == (None, False)
    seen, up = group_up([r(0, "running", 40), r(1, "running", 40)], None)  # both set up: steps noted
    assert seen == {0: 40, 1: 40} and not up
    assert group_up([r(0, "running", 41), r(1, "running", 40)], seen) == (seen, False)
    assert group_up([r(0, "running", 42), r(1, "running", 41)], seen) == (seen, True)
    assert group_up([r(0, "running", 40), r(1, "failed", 40)], seen)[1]  # a failed group refills too
    assert group_up([r(0, "starting", None), r(1, "running", 3, alive=False)], None)[1]


def test_a_refill_cancels_the_fallback_a_take_scheduled(monkeypatch):
    """Once the pool was refilled (the taker's group came up), the take's fallback is moot; left
    pending it would also keep later takes from scheduling theirs (one timer at a time)."""
    import threading

    import trainguard.workers.group as group_mod

    monkeypatch.setattr(group_mod, "REFILL_FALLBACK_S", 0.2)
    pool = group_mod.WarmPool(0)  # full with none: refill() itself starts nothing
    fired = threading.Event()
    monkeypatch.setattr(pool, "_refill_quietly", fired.set)
    pool._replace_taken(False)
    timer = pool._timer
    assert timer is not None and timer.is_alive()
    pool.refill()
    timer.join(10)  # a cancelled timer's thread ends without calling its function
    assert not timer.is_alive() and not fired.is_set() and pool._timer is None
    pool._replace_taken(False)  # a later take schedules its own
    assert pool._timer is not None and pool._timer is not timer
    assert fired.wait(10)
    pool.close()
