"""Every fault the workers can inject, end to end against real Ray workers: the right incident
kind is recorded, DESIGN.md's recovery action is taken, and the run finishes its stage."""
from __future__ import annotations

import statistics

import pytest

from trainguard.service.analyze import analyze_file

from tests.conftest import wait_for
from tests.integration.supervisor.harness import (
    incidents, metrics_log, running_controller, tiny_pipeline, wait_state,
)

pytestmark = pytest.mark.integration


def _only(incs, kind):
    got = [i for i in incs if i.kind == kind]
    assert got, f"no {kind} incident; recorded: {[(i.kind, i.onset_step, i.action) for i in incs]}"
    return got


def test_loss_spike_rolls_back_before_onset_skips_batches_and_recovers(ray_session, tmp_state):
    spec = tiny_pipeline(steps=140, faults=[{"kind": "loss_spike", "at_step": 80, "duration": 6}])
    with running_controller(tmp_state) as ctl:
        run_id = ctl.submit(spec, actor="test")
        assert wait_state(ctl, run_id) == "completed"
        spikes = _only(incidents(ctl, run_id), "loss_spike")
    assert len(spikes) == 1, "one spike, one incident"
    inc = spikes[0]
    assert abs(inc.onset_step - 80) <= 3, inc.onset_step
    assert inc.action == "rollback" and inc.outcome == "resolved"
    assert inc.rollback_to_step is not None and inc.rollback_to_step < inc.onset_step
    assert inc.recovery_seconds is not None and inc.recovery_seconds >= 0
    skip = [tuple(r) for r in inc.skip]
    assert any(a <= 80 < b for a, b in skip), f"the corrupted batches are in the skip list {skip}"
    log = metrics_log(tmp_state, run_id, "pretrain")
    # after the rollback (the step counter goes back), no skipped batch is trained on again
    back = next(i for i in range(1, len(log)) if log[i]["step"] <= log[i - 1]["step"])
    replay = [r["batch_index"] for r in log[back:]]
    assert not [b for b in replay if any(a <= b < e for a, e in skip)]
    # the loss returns to its pre-spike band
    pre = statistics.median(r["loss"] for r in log[:back] if 60 <= r["step"] < 80)
    end = statistics.median(r["loss"] for r in log[-10:])
    assert end <= pre * 1.15, (pre, end)
    # the post-mortem tool finds the same spike in the log the worker wrote
    found = [f for f in analyze_file(tmp_state / "runs" / run_id / "pretrain" / "metrics-rank0.jsonl")
             if f["kind"] == "loss_spike"]
    assert found and abs(found[0]["onset_step"] - inc.onset_step) <= 2, found


def test_nan_rolls_back(ray_session, tmp_state):
    spec = tiny_pipeline(steps=90, faults=[{"kind": "nan", "at_step": 50, "duration": 2}])
    with running_controller(tmp_state) as ctl:
        run_id = ctl.submit(spec, actor="test")
        assert wait_state(ctl, run_id) == "completed"
        inc = _only(incidents(ctl, run_id), "nan")[0]
    assert inc.action == "rollback" and inc.rollback_to_step < 50 and abs(inc.onset_step - 50) <= 3


def test_worker_crash_restarts_group_from_newest_good_checkpoint(ray_session, tmp_state):
    spec = tiny_pipeline(steps=80, world_size=2, faults=[{"kind": "worker_crash", "at_step": 45, "rank": 1}])
    with running_controller(tmp_state) as ctl:
        run_id = ctl.submit(spec, actor="test")
        assert wait_state(ctl, run_id) == "completed"
        inc = _only(incidents(ctl, run_id), "worker_lost")[0]
    assert inc.action == "restart" and inc.outcome == "resolved"
    assert inc.rollback_to_step == 40  # newest good checkpoint, no margin for hardware faults
    assert not inc.skip and inc.lr_multiplier in (None, 1.0)


def test_hang_is_detected_by_heartbeat_and_restarts(ray_session, tmp_state):
    """Rank 0 blocks for ever; rank 1 blocks in the next all-reduce. Both processes go idle
    (workers/runtime/busy.py), so the hang is declared at the idle floor (1 s), not at the
    heartbeat's floor (hang_timeout 3 s)."""
    spec = tiny_pipeline(steps=70, world_size=2, faults=[{"kind": "hang", "at_step": 35, "rank": 0}])
    with running_controller(tmp_state, hang_timeout=3.0) as ctl:
        run_id = ctl.submit(spec, actor="test")
        assert wait_state(ctl, run_id) == "completed"
        inc = _only(incidents(ctl, run_id), "hang")[0]
    assert inc.action == "restart" and inc.rollback_to_step == 30
    assert sorted(inc.evidence["ranks"]) == [0, 1]
    assert inc.evidence["threshold"] < 3.0 and min(inc.evidence["idle_seconds"].values()) >= 1.0


def test_gpu_xid_restarts_group(ray_session, tmp_state):
    spec = tiny_pipeline(steps=70, faults=[{"kind": "gpu_xid", "at_step": 35}])
    with running_controller(tmp_state) as ctl:
        run_id = ctl.submit(spec, actor="test")
        assert wait_state(ctl, run_id) == "completed"
        inc = _only(incidents(ctl, run_id), "gpu_fault")[0]
    assert inc.action == "restart"


def test_slow_rank_is_reported_as_straggler(ray_session, tmp_state):
    spec = tiny_pipeline(steps=70, world_size=2,
                         faults=[{"kind": "slow", "at_step": 20, "rank": 1, "duration": 30, "factor": 0.15}])
    with running_controller(tmp_state) as ctl:
        run_id = ctl.submit(spec, actor="test")
        assert wait_state(ctl, run_id) == "completed"
        inc = _only(incidents(ctl, run_id), "straggler")[0]
    assert inc.action == "notify" and inc.evidence


def test_corrupted_checkpoint_is_quarantined_and_never_used(ray_session, tmp_state):
    spec = tiny_pipeline(steps=80, faults=[{"kind": "checkpoint_corrupt", "at_step": 40},
                                           {"kind": "loss_spike", "at_step": 55, "duration": 5}])
    with running_controller(tmp_state) as ctl:
        run_id = ctl.submit(spec, actor="test")
        assert wait_state(ctl, run_id) == "completed"
        incs = incidents(ctl, run_id)
    bad = _only(incs, "checkpoint_corrupt")[0]
    assert bad.action == "quarantine" and "model.pt" in str(bad.evidence)
    spike = _only(incs, "loss_spike")[0]
    assert spike.rollback_to_step is not None and spike.rollback_to_step != bad.onset_step


def test_spike_that_keeps_coming_back_ends_in_needs_attention(ray_session, tmp_state):
    # a long stretch of bad data: every widened skip still lands inside it
    spec = tiny_pipeline(steps=150, keep_last=20, faults=[{"kind": "loss_spike", "at_step": 60, "duration": 400,
                                                           "once": False}])
    with running_controller(tmp_state) as ctl:
        run_id = ctl.submit(spec, actor="test")
        assert wait_state(ctl, run_id, timeout=180) == "needs_attention"
        incs = [i for i in incidents(ctl, run_id) if i.kind in ("loss_spike", "divergence", "nan", "grad_explosion")]
        d = ctl.drivers.get(run_id)
        assert d is not None and d.active is not None
        wait_for(lambda: d.active.paused_ranks == {0}, 30, what="the workers report paused")
    actions = [i.action for i in incs]
    assert actions[-1] == "needs_attention"
    # the policy's rule: max_attempts rollbacks in the region of the last onset, then a human.
    # Each rollback goes back >= margin steps and the bad stretch starts again at once, so the
    # onsets march back (61, 51, 41, ...); whether the first leaves the region depends on a
    # detector's onset by one step, so the total count of rollbacks may be one more.
    cfg = ctl.watch_config.recovery
    last = incs[-1].onset_step
    in_region = [i for i in incs if i.action == "rollback" and abs(i.onset_step - last) <= cfg.region]
    assert len(in_region) == cfg.max_attempts, [(i.onset_step, i.action) for i in incs]
    assert cfg.max_attempts <= actions.count("rollback") <= cfg.max_attempts + 1
    lrs = [i.lr_multiplier for i in incs if i.action == "rollback"]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0], "LR lowered further on every attempt"


def test_spike_in_a_stages_last_steps_is_rolled_back_not_shipped(ray_session, tmp_state):
    """The loop may end before the watch has seen its last steps, or before a rollback sent to
    it reaches a step boundary: the stage counts as done only after a last look, and a rollback
    it did not apply restarts the stage from the rollback's checkpoint."""
    spec = tiny_pipeline(steps=100, faults=[{"kind": "loss_spike", "at_step": 94, "duration": 4}])
    with running_controller(tmp_state) as ctl:
        run_id = ctl.submit(spec, actor="test")
        assert wait_state(ctl, run_id) == "completed"
        inc = _only(incidents(ctl, run_id), "loss_spike")[0]
    assert inc.action == "rollback" and inc.outcome == "resolved", (inc.action, inc.outcome)
    assert inc.rollback_to_step is not None and inc.rollback_to_step < 94
    log = metrics_log(tmp_state, run_id, "pretrain")
    back = [i for i in range(1, len(log)) if log[i]["step"] <= log[i - 1]["step"]]
    assert back, "the workers went back before the stage's output was written"
    assert log[-1]["step"] == 100 and log[back[-1]]["step"] == inc.rollback_to_step + 1
