"""The run driver on its own thread against a real store, fake worker groups and a fake
metrics source (no Ray): a stage runs to completion; a rollback its loop ended too soon to
apply restarts the stage from the rollback's checkpoint with the skip list and LR in effect."""
from __future__ import annotations

import time
from typing import Any

from trainguard.service.domain.evaluate import WatchConfig
from trainguard.service.domain.state import RunState, StageState
from trainguard.service.supervisor.catalog import CheckpointCatalog
from trainguard.service.supervisor.driver import DriverParts, RunDriver
from trainguard.service.supervisor.executor import RecoveryExecutor
from trainguard.service.supervisor.goodput import GoodputClock
from trainguard.service.supervisor.ingest import Watch
from trainguard.service.telemetry import SupervisorMetrics

from tests.unit.service.supervisor.fakes import (
    FakeSource, FakeWorkerGroup, checkpoint_folder, ledger_in, new_run, steps, tiny_spec,
)


class _Supervisor:
    """The facade's wiring, minus Ray: scripted groups come out of `start_group` in order."""

    def __init__(self, tmp_path, scripts: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]) -> None:
        self.ledger = ledger_in(tmp_path)
        metrics = SupervisorMetrics()
        self.source = FakeSource()
        self.catalog = CheckpointCatalog(self.ledger, metrics.incidents)
        self.executor = RecoveryExecutor(self.ledger, self.catalog, metrics, WatchConfig(), self)
        self.drivers: dict[str, RunDriver] = {}
        self.watch = Watch(self.ledger, self.executor, self.source, WatchConfig(),
                           lambda: [(d.run_id, a) for d in self.drivers.values() if (a := d.running_stage())])
        self.scripts = list(scripts)
        self.started: list[FakeWorkerGroup] = []
        self.parts = DriverParts(ledger=self.ledger, catalog=self.catalog, executor=self.executor, watch=self.watch,
                                 goodput=GoodputClock(), state_dir=tmp_path, start_group=self._start_group)

    def _start_group(self, **kwargs: Any) -> FakeWorkerGroup:
        script, records = self.scripts.pop(0)
        g = FakeWorkerGroup(script, records, **kwargs)
        self.source.groups[g.port] = g
        self.started.append(g)
        return g

    def request_restart(self, run_id: str, *, checkpoint: str | None, incident: int) -> bool:
        self.drivers[run_id].request_restart(checkpoint=checkpoint, incident=incident)
        return True

    def run(self, run_id: str) -> RunDriver:
        d = self.drivers[run_id] = RunDriver(self.parts, run_id, tiny_spec(steps=30))
        d.start()
        d.join(20)
        assert not d.is_alive(), "the driver did not end"
        return d


def test_a_stage_whose_group_finishes_completes_the_run(tmp_path):
    sup = _Supervisor(tmp_path, [([{"state": "running"}, {"state": "finished", "output_checkpoint": "/out/30"}],
                                  steps(1, 30))])
    run_id = new_run(sup.ledger, steps=30)
    sup.run(run_id)
    (stage,) = sup.ledger.stages(run_id)
    assert (stage.state, stage.output_checkpoint, stage.first_loss, stage.final_loss) == (
        StageState.COMPLETED, "/out/30", 2.0, 2.0)
    assert sup.ledger.run_state(run_id) is RunState.COMPLETED
    assert sup.started[0].closed and sup.started[0].started_with["resume_from"] is None
    assert [t.port for t in sup.source.forgotten] == [sup.started[0].port]


def _nan_in_the_last_steps(tmp_path) -> tuple[Any, list]:
    """Checkpoint 10's report, and the scripts of two groups: the first reports checkpoint 10,
    trains into a NaN at step 28 and finishes before its next step boundary (it never applies
    a rollback decided after the NaN); the second, restarted from checkpoint 10, finishes."""
    report = checkpoint_folder(tmp_path / "ck", 10)
    nan_at_28 = [*steps(1, 27), *steps(28, 28, loss=float("nan")), *steps(29, 30)]
    return report, [
        ([{"state": "running", "checkpoints": [report]}, {"state": "finished", "output_checkpoint": "/out/30",
                                                           "rollbacks_applied": []}], nan_at_28),
        ([{"state": "running"}, {"state": "finished", "output_checkpoint": "/out/30b"}], steps(11, 30)),
    ]


def test_a_rollback_the_loop_ended_too_soon_to_apply_restarts_the_stage_from_its_checkpoint(tmp_path):
    report, scripts = _nan_in_the_last_steps(tmp_path)
    sup = _Supervisor(tmp_path, scripts)
    run_id = new_run(sup.ledger, steps=30)
    sup.run(run_id)
    first, second = sup.started
    assert [k for k, _ in first.controls] == ["rollback"]
    assert second.started_with["resume_from"].path == report.ref.path
    assert second.started_with["skip"] and second.started_with["lr_multiplier"] == 0.5
    (inc,) = sup.ledger.stage_incidents(run_id, "pretrain")
    assert (inc.kind, inc.action, inc.outcome, inc.rollback_to_step) == ("nan", "rollback", "resolved", 10)
    (stage,) = sup.ledger.stages(run_id)
    assert stage.state == StageState.COMPLETED and stage.output_checkpoint == "/out/30b"
    assert sup.ledger.run_state(run_id) is RunState.COMPLETED


def test_a_stop_ends_the_stage_and_kills_the_group(tmp_path):
    sup = _Supervisor(tmp_path, [([{"state": "running"}], steps(1, 5))])
    run_id = new_run(sup.ledger, steps=30)
    d = sup.drivers[run_id] = RunDriver(sup.parts, run_id, tiny_spec(steps=30))
    d.start()
    deadline = time.monotonic() + 10
    while d.running_stage() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    sup.ledger.set_state(run_id, RunState.STOPPED, actor="test", reason="operator stop")
    sup.started[0].script = [{"state": "stopped"}]
    d.request_stop()
    d.join(10)
    assert not d.is_alive() and sup.started[0].closed
    assert sup.ledger.stages(run_id)[0].state == StageState.STOPPED


def _start_failures(sup: _Supervisor, run_id: str) -> list[Any]:
    from trainguard.service.db import crud

    with sup.ledger.session() as s:
        return [e for e in crud.list_events(s, run_id=run_id) if e.kind == "group_start_failed"]


def _node_lost(step: int) -> dict[str, Any]:
    """A poll of a 2-rank group whose rank 1 died with its node."""
    return {"state": "failed", "failed_rank": 1, "error": "rank 1: worker process died",
            "ranks": [{"rank": 0, "step": step, "state": "running", "alive": True, "node": "n-head", "node_alive": None},
                      {"rank": 1, "step": None, "state": "failed", "alive": False, "error": "died",
                       "node": "n-worker2", "node_alive": False}]}


def test_a_lost_node_restarts_the_group_and_a_restart_that_dies_before_its_first_step_is_retried(tmp_path):
    report = checkpoint_folder(tmp_path / "ck", 10)
    sup = _Supervisor(tmp_path, [
        ([{"state": "running", "checkpoints": [report]}, _node_lost(15)], steps(1, 15)),
        # the first group started for the recovery dies before its first step (a spare that lived
        # on the lost node): another is started from the same checkpoint
        ([{"state": "running"}, {"state": "failed", "failed_rank": 0, "error": "rank 0: actor unavailable",
                                 "ranks": [{"rank": 0, "step": None, "state": "failed", "alive": False}]}], []),
        ([{"state": "running"}, {"state": "finished", "output_checkpoint": "/out/30"}], steps(11, 30)),
    ])
    run_id = new_run(sup.ledger, steps=30)
    sup.run(run_id)
    first, second, third = sup.started
    assert second.started_with["resume_from"].path == third.started_with["resume_from"].path == report.ref.path
    assert first.closed and second.closed
    (inc,) = sup.ledger.stage_incidents(run_id, "pretrain")
    assert (inc.kind, inc.action, inc.outcome, inc.rollback_to_step) == ("node_lost", "restart", "resolved", 10)
    assert inc.evidence["nodes"] == ["n-worker2"] and inc.evidence["ranks"] == [1]
    assert [(e.detail["attempt"], e.result) for e in _start_failures(sup, run_id)] == [(1, "retry")]
    assert sup.ledger.run_state(run_id) is RunState.COMPLETED


def test_a_recovery_whose_groups_never_start_needs_an_operator_and_ends_the_driver(tmp_path):
    from trainguard.service.supervisor.driver import START_TRIES

    report = checkpoint_folder(tmp_path / "ck", 10)
    dead = ([{"state": "running"}, {"state": "failed", "failed_rank": 0, "error": "rank 0: died",
                                    "ranks": [{"rank": 0, "step": None, "state": "failed", "alive": False}]}], [])
    sup = _Supervisor(tmp_path, [([{"state": "running", "checkpoints": [report]}, _node_lost(15)], steps(1, 15)),
                                 *[dead] * START_TRIES])
    run_id = new_run(sup.ledger, steps=30)
    sup.run(run_id)
    assert len(sup.started) == 1 + START_TRIES and all(g.closed for g in sup.started)
    (inc,) = sup.ledger.stage_incidents(run_id, "pretrain")
    assert (inc.kind, inc.outcome) == ("node_lost", "needs_attention")
    assert sup.ledger.run_state(run_id) is RunState.NEEDS_ATTENTION
    assert [e.result for e in _start_failures(sup, run_id)] == ["retry"] * (START_TRIES - 1) + ["needs_attention"]


def test_a_recovery_group_without_a_step_by_the_deadline_is_replaced(tmp_path, monkeypatch):
    from trainguard.service.supervisor.driver import START_DEADLINE_ENV

    monkeypatch.setenv(START_DEADLINE_ENV, "0.5")
    report = checkpoint_folder(tmp_path / "ck", 10)
    sup = _Supervisor(tmp_path, [
        ([{"state": "running", "checkpoints": [report]}, _node_lost(15)], steps(1, 15)),
        ([{"state": "running"}], []),  # up, but never a step (a rank stuck on a dead peer)
        # finished at its first poll: the deadline never applies to it, however slow the machine
        ([{"state": "finished", "output_checkpoint": "/out/30"}], steps(11, 30)),
    ])
    run_id = new_run(sup.ledger, steps=30)
    sup.run(run_id)
    assert len(sup.started) == 3 and sup.started[1].closed
    (e,) = _start_failures(sup, run_id)
    assert e.detail["reason"] == "no step within 0.5 s"
    assert sup.ledger.run_state(run_id) is RunState.COMPLETED


def test_a_stage_that_finishes_while_an_approve_mode_proposal_waits_is_held_until_it_is_decided(tmp_path):
    """The spike is in the stage's last steps: its group finishes before the pause that holds it
    arrives. The stage is not done (its output is what the proposal would undo); approving
    carries the rollback out as a restart from the proposed checkpoint."""
    import threading

    report, scripts = _nan_in_the_last_steps(tmp_path)
    sup = _Supervisor(tmp_path, scripts)
    spec = tiny_spec(steps=30)
    run_id = sup.ledger.create_run(name=spec.name, spec_json=spec.model_dump_json(), actor="test",
                                   recovery_mode="approve")
    held_when_approved: list[bool] = []

    def operator() -> None:  # approves the proposal once it waits, as Controller.approve_proposal does
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            waiting = sup.ledger.waiting_proposals(run_id, "pretrain")
            active = sup.drivers[run_id].active if run_id in sup.drivers else None
            if waiting and active is not None and active.held_by_proposal:
                held_when_approved.append(sup.ledger.stages(run_id)[0].state != StageState.COMPLETED)
                with sup.ledger.lock(run_id):
                    sup.executor.carry_out_proposal(run_id, active, waiting[0], actor="op")
                    sup.ledger.update_proposal(run_id, int(waiting[0].id), state="approved", decided_by="op",
                                               decided_at=sup.ledger.now())
                return
            time.sleep(0.05)

    t = threading.Thread(target=operator)
    t.start()
    sup.run(run_id)
    t.join(5)
    assert held_when_approved == [True]  # the stage was not completed while the proposal waited
    first, second = sup.started
    assert second.started_with["resume_from"].path == report.ref.path and second.started_with["skip"]
    (stage,) = sup.ledger.stages(run_id)
    assert stage.state == StageState.COMPLETED and stage.output_checkpoint == "/out/30b"
    assert sup.ledger.run_state(run_id) is RunState.COMPLETED


def _adopted(tmp_path, attach: Any) -> tuple[_Supervisor, str, list[dict[str, Any]]]:
    """A run whose stage had started under a previous supervisor, driven by a driver that
    re-attaches (`attach` stands in for workers.group.attach_group)."""
    from trainguard.service.db import crud

    sup = _Supervisor(tmp_path, [([{"state": "running"}, {"state": "finished", "output_checkpoint": "/out/30"}],
                                  steps(1, 30))])
    def attached(**kw: Any) -> Any:
        g = attach(**kw)
        if g is not None:
            sup.source.groups[g.port] = g  # its one rank's records reach the watch
        return g

    sup.parts.attach_group = attached
    run_id = new_run(sup.ledger, steps=30)
    sup.ledger.start_stage(run_id, "pretrain")  # it ran before: the supervisor restarted
    d = sup.drivers[run_id] = RunDriver(sup.parts, run_id, tiny_spec(steps=30), reattach=True)
    d.start()
    d.join(20)
    assert not d.is_alive(), "the driver did not end"
    with sup.ledger.session() as s:
        events = [e.model_dump() for e in crud.list_events(s, run_id=run_id, limit=1000)]
    return sup, run_id, events


def test_an_adopted_run_goes_on_with_its_live_detached_group_nothing_restarted(tmp_path):
    live = FakeWorkerGroup([{"state": "running"}, {"state": "finished", "output_checkpoint": "/out/30"}], steps(1, 30))
    live.attached, live.identities = True, [{"rank": 0, "pid": 4242, "actor_id": "a0", "state": "running"}]
    asked: list[dict[str, Any]] = []

    def attach(**kw: Any) -> FakeWorkerGroup:
        asked.append(kw)
        return live

    sup, run_id, events = _adopted(tmp_path, attach)
    assert asked and asked[0]["stage_name"] == "pretrain"
    assert sup.started == [], "no group was started: the live one went on"
    kinds = [e["kind"] for e in events]
    assert "reattached" in kinds and "stage_started" not in kinds
    assert next(e for e in events if e["kind"] == "reattached")["detail"]["ranks"][0]["pid"] == 4242
    assert sup.ledger.run_state(run_id) is RunState.COMPLETED and live.closed


def test_an_adopted_run_without_a_live_group_restarts_from_its_newest_checkpoint(tmp_path):
    sup, run_id, events = _adopted(tmp_path, lambda **kw: None)
    assert len(sup.started) == 1 and "stage_started" in [e["kind"] for e in events]
    assert sup.ledger.run_state(run_id) is RunState.COMPLETED
