"""The watch's hang check against an operator's pause (pure: an ActiveStage and a clock)."""
from __future__ import annotations

from trainguard.service.adapters.metrics import Target
from trainguard.service.controller import ActiveStage
from trainguard.service.domain import detectors as D
from trainguard.service.watch import WatchConfig, _hang


def _stage(last_beat: float) -> ActiveStage:
    active = ActiveStage(run_id="r", name="pretrain", kind="pretrain", index=0, steps=100)
    active.targets = [Target(run="r", stage="pretrain", rank=0, host="127.0.0.1", port=1)]
    active.heartbeat = {0: last_beat}
    active.series(0).append({"step": 30, "step_seconds": 0.1})
    return active


CFG = WatchConfig(hang=D.HangConfig(timeout_s=4.0))


def test_a_rank_without_a_step_for_longer_than_the_timeout_hangs():
    assert _hang(_stage(last_beat=1000.0), CFG, now=1010.0) is not None


def test_the_time_a_run_was_paused_by_an_operator_is_not_a_hang():
    """Paused at step 30 for 8 s, resumed 1 s ago: the first step after the resume is not due yet."""
    active = _stage(last_beat=1000.0)
    active.resumed_at = 1009.0
    assert _hang(active, CFG, now=1010.0) is None
    assert _hang(active, CFG, now=1014.0) is not None  # and the clock does run again from the resume
