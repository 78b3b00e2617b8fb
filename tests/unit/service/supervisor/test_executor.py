"""The recovery executor against a real store and a fake worker group (no Ray): what each
decision sends to the workers, what it writes to the store, and how a recovery completes."""
from __future__ import annotations

from trainguard.service.domain.detectors import Finding
from trainguard.service.domain.evaluate import WatchConfig
from trainguard.service.domain.policy import Action, RecoveryConfig
from trainguard.service.domain.state import RunState
from trainguard.service.supervisor.catalog import CheckpointCatalog
from trainguard.service.supervisor.executor import RecoveryExecutor
from trainguard.service.supervisor.stage import ActiveStage
from trainguard.service.telemetry import SupervisorMetrics
from trainguard.workers.contract import ControlKind

from tests.unit.service.supervisor.fakes import (
    FakeWorkerGroup, RecordingRestarter, checkpoint_folder, ledger_in, new_run, steps,
)


def _setup(tmp_path, *, group=True, config=WatchConfig()):
    ledger = ledger_in(tmp_path)
    metrics = SupervisorMetrics()
    catalog = CheckpointCatalog(ledger, metrics.incidents)
    restarter = RecordingRestarter()
    executor = RecoveryExecutor(ledger, catalog, metrics, config, restarter)
    run_id = new_run(ledger)
    ledger.set_state(run_id, RunState.RUNNING, actor="test", reason="started")
    catalog.register(run_id, "pretrain", [checkpoint_folder(tmp_path / "ck", s) for s in (20, 40, 60)])
    active = ActiveStage(run_id=run_id, name="pretrain", kind="pretrain", index=0, steps=100,
                         group=FakeWorkerGroup([{"state": "running"}]) if group else None)
    for rec in steps(1, 75):
        active.series(0).append(rec)
    active.last_step, active.batch_cursor = 75, 74
    return ledger, executor, restarter, run_id, active


def _spike(onset: int = 70) -> Finding:
    return Finding("loss_spike", onset, onset + 2, {"score": 9.0})


def test_a_spike_rolls_the_live_group_back_and_the_store_shows_the_lr_it_set(tmp_path):
    ledger, executor, restarter, run_id, active = _setup(tmp_path)
    handled = executor.handle(run_id, active, _spike(), source="watch")
    assert handled.created and handled.action is Action.ROLLBACK
    ((kind, payload),) = active.group.controls
    assert kind is ControlKind.ROLLBACK and payload["incident"] == handled.incident
    assert payload["checkpoint"]["path"].endswith("step-00000060") and payload["checkpoint"]["files"]
    assert payload["skip"] == [(60, 90)] and payload["lr_multiplier"] == 0.5
    inc = ledger.incident(handled.incident)
    assert (inc.action, inc.outcome, inc.rollback_to_step, inc.lr_multiplier) == ("rollback", "recovering", 60, 0.5)
    assert ledger.run(run_id).lr_multiplier == 0.5 and ledger.run_state(run_id) is RunState.RECOVERING
    assert active.pending is not None and active.pending.target_step == 60 and not restarter.requests
    # the same problem seen by another detector while the rollback is in flight: merged, not recovered twice
    again = executor.handle(run_id, active, Finding("divergence", 71, 74, {}), source="alert", fingerprint="fp1")
    assert not again.created and again.incident == handled.incident and len(active.group.controls) == 1
    assert ledger.incident(handled.incident).alert_fingerprints == ["fp1"]
    # rank 0's first step after the checkpoint completes it
    assert not active.pending.taken_effect(76) and active.pending.taken_effect(61)
    executor.recovered(active, step=61, at=active.pending.detected_at + 2.0)
    inc = ledger.incident(handled.incident)
    assert inc.outcome == "resolved" and inc.recovery_seconds == 2.0
    assert ledger.run_state(run_id) is RunState.RUNNING and active.pending is None


def test_without_a_live_group_the_rollback_is_a_restart_by_the_driver(tmp_path):
    ledger, executor, restarter, run_id, active = _setup(tmp_path, group=False)
    handled = executor.handle(run_id, active, _spike(), source="watch")
    assert restarter.requests == [(run_id, str(tmp_path / "ck" / "step-00000060"), handled.incident)]
    assert active.pending.restart and not active.pending.taken_effect(61)
    active.new_group(FakeWorkerGroup([{"state": "running"}]), [], resumed_at_step=active.pending.target_step)
    assert active.pending.taken_effect(61)
    # the detectors keep the history up to the checkpoint the new group resumes from
    assert [int(r["step"]) for r in active.records[0]] == list(range(1, 61))


def test_a_corrupt_rollback_target_is_quarantined_and_the_next_older_one_taken(tmp_path):
    ledger, executor, _, run_id, active = _setup(tmp_path)
    (tmp_path / "ck" / "step-00000060" / "model.pt").write_bytes(b"flipped")
    handled = executor.handle(run_id, active, _spike(), source="watch")
    assert ledger.incident(handled.incident).rollback_to_step == 40
    assert {i.kind for i in ledger.stage_incidents(run_id, "pretrain")} == {"loss_spike", "checkpoint_corrupt"}


def test_an_exhausted_budget_pauses_the_run_for_an_operator(tmp_path):
    config = WatchConfig(recovery=RecoveryConfig(budgets={"spike": 0}))
    ledger, executor, _, run_id, active = _setup(tmp_path, config=config)
    handled = executor.handle(run_id, active, _spike(), source="watch")
    assert handled.action is Action.NEEDS_ATTENTION
    assert active.group.controls == [(ControlKind.PAUSE, {})]
    assert ledger.run_state(run_id) is RunState.NEEDS_ATTENTION and active.pending is None


def test_findings_for_an_ended_run_change_nothing(tmp_path):
    ledger, executor, _, run_id, active = _setup(tmp_path)
    ledger.set_state(run_id, RunState.STOPPED, actor="test", reason="operator stop")
    handled = executor.handle(run_id, active, _spike(), source="watch")
    assert handled.incident is None and handled.ignored and ledger.stage_incidents(run_id, "pretrain") == []


def test_a_lost_worker_restarts_the_group_from_the_newest_good_checkpoint(tmp_path):
    ledger, executor, restarter, run_id, active = _setup(tmp_path)
    status = {"state": "failed", "failed_rank": 1, "error": "rank 1: worker process died",
              "ranks": [{"rank": 0, "step": 75, "state": "running", "alive": True},
                        {"rank": 1, "step": None, "state": "failed", "alive": False}]}
    executor.worker_lost(run_id, active, status)
    executor.worker_lost(run_id, active, status)  # polled again before the restart: no second incident
    (inc,) = ledger.stage_incidents(run_id, "pretrain")
    assert (inc.kind, inc.action, inc.onset_step, inc.rollback_to_step) == ("worker_lost", "restart", 75, 60)
    assert len(restarter.requests) == 1 and active.group.controls == []


def test_a_rank_lost_before_a_rollback_landed_restarts_from_the_rollbacks_checkpoint_and_both_resolve(tmp_path):
    """The watch saw a spike late (onset 50, the workers already past the step-60 checkpoint) and
    sent a rollback to 40; a rank died before it was applied. The restart must not start from
    the newest checkpoint (60, after the spike): the in-flight rollback's target bounds it, its
    skip goes with it, and the new group's first step resolves both incidents."""
    ledger, executor, restarter, run_id, active = _setup(tmp_path)
    spike = executor.handle(run_id, active, _spike(onset=50), source="watch")
    assert active.pending.target_step == 40 and not active.pending.restart
    status = {"state": "failed", "failed_rank": 1, "error": "rank 1: worker process died",
              "ranks": [{"rank": 0, "step": 75, "state": "running", "alive": True},
                        {"rank": 1, "step": None, "state": "failed", "alive": False}]}
    executor.worker_lost(run_id, active, status)
    lost = next(i for i in ledger.stage_incidents(run_id, "pretrain") if i.kind == "worker_lost")
    assert (lost.action, lost.rollback_to_step) == ("restart", 40)
    assert restarter.requests == [(run_id, str(tmp_path / "ck" / "step-00000040"), lost.id)]
    assert ledger.incident(spike.incident).outcome == "recovering"
    active.new_group(FakeWorkerGroup([{"state": "running"}]), [], resumed_at_step=active.pending.target_step)
    executor.recovered(active, step=41, at=active.pending.detected_at + 1.0)
    assert ledger.incident(lost.id).outcome == "resolved"
    spiked = ledger.incident(spike.incident)
    assert spiked.outcome == "resolved" and spiked.recovery_seconds >= 1.0


def test_after_a_rollback_an_episode_left_in_the_kept_history_is_not_found_again(tmp_path):
    """A rollback spiral: handled episodes in the history the buffers keep after the workers
    go back stay handled; what comes after the rollback point is watched afresh."""
    _, _, _, _, active = _setup(tmp_path)
    active.handled_until.update({"divergence": 74, "loss_spike": 30})
    active.went_back(60)  # the workers resumed at step 61: records after 60 are gone
    assert active.handled_until == {"divergence": 60, "loss_spike": 30}
    active.went_back(None)  # nothing kept (a group started without a checkpoint)
    assert active.handled_until == {}
