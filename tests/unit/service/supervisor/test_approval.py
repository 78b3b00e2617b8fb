"""Approval modes against a real store and a fake worker group (no Ray): in approve mode a spike
becomes a proposal and nothing is sent but a pause; approving carries out exactly the proposed
rollback; rejecting changes nothing; observe mode never acts."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from trainguard.service import errors
from trainguard.service.config import Settings
from trainguard.service.controller import Controller
from trainguard.service.domain.detectors import Finding
from trainguard.service.domain.policy import Action
from trainguard.service.domain.proposal import RecoveryMode, holds_training, proposes
from trainguard.service.domain.state import RunState
from trainguard.service.supervisor.stage import ActiveStage
from trainguard.workers.contract import ControlKind

from tests.unit.service.supervisor.fakes import FakeWorkerGroup, checkpoint_folder, steps, tiny_spec


class RecordingAnnotator:
    """Stands in for adapters.grafana.BackgroundAnnotator: records what would be posted."""

    def __init__(self) -> None:
        self.posted: list[dict] = []

    def post(self, *, text: str, tags: list[str], time_ms: int | None = None) -> None:
        self.posted.append({"text": text, "tags": tags})

    def close(self) -> None:
        pass


def _controller(tmp_path, mode: str, **settings):
    """A Controller (never started: no Ray) with one run in `mode`, running with a fake group at step 75."""
    ctl = Controller(Settings(environment="development", state_dir=tmp_path / "state", **settings))
    ctl.annotator = RecordingAnnotator()
    spec = tiny_spec(100)
    run_id = ctl.ledger.create_run(name=spec.name, spec_json=spec.model_dump_json(), actor="test", recovery_mode=mode)
    ctl.ledger.set_state(run_id, RunState.RUNNING, actor="test", reason="started")
    ctl.catalog.register(run_id, "pretrain", [checkpoint_folder(tmp_path / "ck", s) for s in (20, 40, 60)])
    active = ActiveStage(run_id=run_id, name="pretrain", kind="pretrain", index=0, steps=100,
                         group=FakeWorkerGroup([{"state": "running"}]))
    for rec in steps(1, 75):
        active.series(0).append(rec)
    active.last_step, active.batch_cursor = 75, 74
    ctl.drivers[run_id] = SimpleNamespace(active=active, running_stage=lambda: active)  # the driver's view of it
    return ctl, run_id, active


def _spike(onset: int = 70) -> Finding:
    return Finding("loss_spike", onset, onset + 2, {"score": 9.0})


def _store(ctl, run_id):
    run = ctl.ledger.run(run_id)
    incs = [(i.id, i.action, i.outcome, i.rollback_to_step, i.skip, i.lr_multiplier)
            for i in ctl.ledger.stage_incidents(run_id, "pretrain")]
    return run.state, run.lr_multiplier, incs


def test_the_mode_table():
    assert not proposes(RecoveryMode.AUTO, Action.ROLLBACK)
    assert proposes("approve", Action.ROLLBACK) and proposes("approve", Action.RESTART)
    assert not proposes("approve", Action.NEEDS_ATTENTION) and not proposes("approve", Action.NOTIFY)
    assert proposes("observe", Action.NEEDS_ATTENTION) and not proposes("observe", Action.NOTIFY)
    assert holds_training("approve", Action.ROLLBACK) and not holds_training("observe", Action.ROLLBACK)


def test_approve_mode_a_spike_is_a_proposal_and_approving_sends_exactly_that_rollback(tmp_path):
    ctl, run_id, active = _controller(tmp_path, "approve")
    handled = ctl.executor.handle(run_id, active, _spike(), source="watch")
    assert handled.created and handled.proposal is not None and handled.action is Action.ROLLBACK
    # nothing but a pause reaches the workers; the run waits for an operator; nothing recovered
    assert active.group.controls == [(ControlKind.PAUSE, {})] and active.pending is None
    assert ctl.ledger.run_state(run_id) is RunState.NEEDS_ATTENTION and ctl.ledger.run(run_id).lr_multiplier == 1.0
    inc = ctl.ledger.incident(handled.incident)
    assert (inc.action, inc.outcome, inc.evidence["proposal"]) == (None, "open", handled.proposal)
    prop = ctl.ledger.proposal(run_id, handled.proposal)
    assert (prop.state, prop.mode, prop.kind, prop.action) == ("proposed", "approve", "loss_spike", "rollback")
    assert (prop.checkpoint_step, prop.skip, prop.lr_target, prop.at_step) == (60, [[60, 90]], 0.5, 75)
    assert prop.checkpoint_ref.endswith("step-00000060") and prop.checkpoint_id is not None
    assert prop.evidence["score"] == 9.0 and prop.evidence["onset_step"] == 70 and "roll back" in prop.reason
    # the same problem seen again by another detector while the proposal waits: merged, not proposed twice
    again = ctl.executor.handle(run_id, active, Finding("divergence", 71, 74, {}), source="watch")
    assert not again.created and again.incident == handled.incident

    out = ctl.approve_proposal(run_id, handled.proposal, actor="operator", note="looks right")
    assert out["state"] == "approved" and out["rollback_to_step"] == 60 and out["run_state"] == "recovering"
    assert [k for k, _ in active.group.controls] == [ControlKind.PAUSE, ControlKind.RESUME, ControlKind.ROLLBACK]
    payload = active.group.controls[-1][1]
    assert payload["checkpoint"]["path"] == prop.checkpoint_ref and payload["checkpoint"]["files"]
    assert payload["skip"] == [(60, 90)] and payload["lr_multiplier"] == 0.5 and payload["incident"] == handled.incident
    inc = ctl.ledger.incident(handled.incident)
    assert (inc.action, inc.outcome, inc.rollback_to_step, inc.skip, inc.lr_multiplier) == \
        ("rollback", "recovering", 60, [[60, 90]], 0.5)
    assert ctl.ledger.run(run_id).lr_multiplier == 0.5 and active.pending.target_step == 60
    prop = ctl.ledger.proposal(run_id, handled.proposal)
    assert (prop.state, prop.decided_by, prop.note) == ("approved", "operator", "looks right")
    kinds = [(e.kind, e.actor) for e in _events(ctl, run_id)]
    assert ("recovery_proposed", "supervisor") in kinds and ("proposal_approved", "operator") in kinds
    assert [p["tags"][-1] for p in ctl.annotator.posted] == ["state:proposed", "state:approved"]
    assert {"trainguard", "proposal", f"run:{run_id}", "kind:loss_spike"} <= set(ctl.annotator.posted[0]["tags"])
    with pytest.raises(errors.Conflict, match="approved already"):
        ctl.approve_proposal(run_id, handled.proposal, actor="operator")


def test_rejecting_changes_nothing(tmp_path):
    ctl, run_id, active = _controller(tmp_path, "approve")
    handled = ctl.executor.handle(run_id, active, _spike(), source="watch")
    state, lr, _ = _store(ctl, run_id)
    out = ctl.reject_proposal(run_id, handled.proposal, actor="operator", note="a data artefact")
    assert out["state"] == "rejected" and out["run_state"] == "needs_attention"
    assert active.group.controls == [(ControlKind.PAUSE, {})] and active.pending is None
    assert ctl.ledger.run_state(run_id) == state and ctl.ledger.run(run_id).lr_multiplier == lr
    inc = ctl.ledger.incident(handled.incident)
    assert (inc.action, inc.outcome, inc.rollback_to_step, inc.skip) == (None, "ignored", None, [])
    assert ctl.ledger.attempts(run_id, "pretrain") == []  # the policy sees no recovery happened
    assert ("proposal_rejected", "operator") in [(e.kind, e.actor) for e in _events(ctl, run_id)]
    with pytest.raises(errors.Conflict, match="rejected already by operator"):
        ctl.approve_proposal(run_id, handled.proposal, actor="operator")
    assert ctl.annotator.posted[-1]["tags"][-1] == "state:rejected"


def test_observe_mode_never_acts_and_its_proposals_cannot_be_approved(tmp_path):
    ctl, run_id, active = _controller(tmp_path, "observe")
    handled = ctl.executor.handle(run_id, active, _spike(), source="watch")
    assert handled.proposal is not None and active.group.controls == [] and active.pending is None
    assert ctl.ledger.run_state(run_id) is RunState.RUNNING and ctl.ledger.run(run_id).lr_multiplier == 1.0
    inc = ctl.ledger.incident(handled.incident)
    assert (inc.action, inc.outcome) == (None, "observed")
    with pytest.raises(errors.Conflict, match="observe mode"):
        ctl.approve_proposal(run_id, handled.proposal, actor="operator")
    assert active.group.controls == [] and ctl.ledger.proposal(run_id, handled.proposal).state == "proposed"
    # a lost worker is proposed too, never restarted
    status = {"state": "failed", "failed_rank": 0, "error": "rank 0 died",
              "ranks": [{"rank": 0, "step": None, "state": "failed", "alive": False}]}
    ctl.executor.worker_lost(run_id, active, status)
    assert active.group.controls == [] and active.pending is None
    assert [p.action for p in ctl.ledger.waiting_proposals(run_id)] == ["rollback", "restart"]
    # an operator's own rollback is carried out in every mode
    ctl.rollback(run_id, checkpoint_id=None, actor="operator")
    assert active.group.controls[-1][0] is ControlKind.ROLLBACK


def test_a_proposal_whose_checkpoint_is_gone_is_refused_and_expires(tmp_path):
    ctl, run_id, active = _controller(tmp_path, "approve")
    handled = ctl.executor.handle(run_id, active, _spike(), source="watch")
    (tmp_path / "ck" / "step-00000060" / "model.pt").write_bytes(b"flipped")
    before = _store(ctl, run_id)
    with pytest.raises(errors.Conflict, match="checkpoint \\(step 60\\)"):
        ctl.approve_proposal(run_id, handled.proposal, actor="operator")
    assert active.group.controls == [(ControlKind.PAUSE, {})]
    assert _store(ctl, run_id)[:2] == before[:2]
    prop = ctl.ledger.proposal(run_id, handled.proposal)
    assert prop.state == "expired" and "checkpoint" in prop.note
    with pytest.raises(errors.NotFound):
        ctl.approve_proposal(run_id, 999, actor="operator")


def test_an_operator_rollback_supersedes_a_waiting_proposal(tmp_path):
    ctl, run_id, active = _controller(tmp_path, "approve")
    handled = ctl.executor.handle(run_id, active, _spike(), source="watch")
    ctl.rollback(run_id, checkpoint_id=None, actor="operator")
    prop = ctl.ledger.proposal(run_id, handled.proposal)
    assert prop.state == "superseded" and ctl.ledger.incident(handled.incident).outcome == "ignored"
    with pytest.raises(errors.Conflict, match="superseded"):
        ctl.approve_proposal(run_id, handled.proposal, actor="operator")


def test_auto_apply_after_the_approval_timeout(tmp_path):
    ctl, run_id, active = _controller(tmp_path, "approve", approval_timeout=0.001)
    handled = ctl.executor.handle(run_id, active, _spike(), source="watch")
    assert ctl.ledger.proposal(run_id, handled.proposal).auto_apply_at is not None
    assert ctl.apply_due_proposals() == 1
    prop = ctl.ledger.proposal(run_id, handled.proposal)
    assert (prop.state, prop.decided_by) == ("approved", "auto-apply")
    assert active.group.controls[-1][0] is ControlKind.ROLLBACK and ctl.apply_due_proposals() == 0


def test_stopping_the_run_expires_waiting_proposals(tmp_path):
    ctl, run_id, active = _controller(tmp_path, "approve")
    handled = ctl.executor.handle(run_id, active, _spike(), source="watch")
    ctl.drivers[run_id].request_stop = lambda: None
    ctl.stop(run_id, actor="operator")
    assert ctl.ledger.proposal(run_id, handled.proposal).state == "expired"


def _events(ctl, run_id):
    from trainguard.service.db import crud

    with ctl.session() as s:
        return crud.list_events(s, run_id=run_id)
