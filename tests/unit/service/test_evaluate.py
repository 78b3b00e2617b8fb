"""The watch's pure half (service/domain/evaluate.py) on an ActiveStage and a clock: the hang
check against an operator's pause, GPU error counters, and an alert's onset."""
from __future__ import annotations

from trainguard.service.adapters.metrics import Target
from trainguard.service.domain import detectors
from trainguard.service.domain.evaluate import WatchConfig, alert_finding, evaluate_stage
from trainguard.service.domain.series import Sample
from trainguard.service.supervisor.stage import ActiveStage


def _stage(last_beat: float) -> ActiveStage:
    active = ActiveStage(run_id="r", name="pretrain", kind="pretrain", index=0, steps=100)
    active.targets = [Target(run="r", stage="pretrain", rank=0, host="127.0.0.1", port=1)]
    active.heartbeat = {0: last_beat}
    active.series(0).append({"step": 30, "step_seconds": 0.1})
    return active


CFG = WatchConfig(hang=detectors.HangConfig(timeout_s=4.0))


def _kinds(active: ActiveStage, now: float) -> list[str]:
    return [f.kind for f in evaluate_stage(active, CFG, now=now)]


def test_a_rank_without_a_step_for_longer_than_the_timeout_hangs():
    assert _kinds(_stage(last_beat=1000.0), now=1010.0) == ["hang"]


def test_the_time_a_run_was_paused_by_an_operator_is_not_a_hang():
    """Paused at step 30 for 8 s, resumed 1 s ago: the first step after the resume is not due yet."""
    active = _stage(last_beat=1000.0)
    active.resumed_at = 1009.0
    assert _kinds(active, now=1010.0) == []
    assert _kinds(active, now=1014.0) == ["hang"]  # and the clock does run again from the resume


def test_a_gpu_error_counter_rising_is_a_fault_whose_onset_follows_the_last_clean_observation():
    active = _stage(last_beat=1000.0)
    active.counter_series[(0, "gpu_xid")] = [Sample(5, 0.0), Sample(30, 1.0)]
    (f,) = [f for f in evaluate_stage(active, CFG, now=1001.0) if f.kind == "gpu_fault"]
    assert f.onset_step == 6 and f.detected_at_step == 30
    active.handled_until["gpu_fault"] = 30  # handled: the same rise is not found again
    assert "gpu_fault" not in _kinds(active, now=1001.0)


def test_an_alert_takes_its_onset_from_the_buffers_else_the_current_step():
    active = _stage(last_beat=1000.0)
    active.last_step = 30
    active.handled_until["hang"] = 30  # an episode already handled still answers an alert about it
    f = alert_finding(active, "hang", {"alertname": "TrainguardHang"}, CFG)
    assert f is not None and f.kind == "hang" and f.evidence["alert_labels"] == {"alertname": "TrainguardHang"}
    g = alert_finding(active, "loss_spike", {}, CFG)
    assert g is not None and (g.onset_step, g.detected_at_step) == (30, 30)
    assert alert_finding(active, "needs_attention", {}, CFG) is None
