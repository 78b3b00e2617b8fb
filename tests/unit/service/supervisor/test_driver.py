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


def test_a_rollback_the_loop_ended_too_soon_to_apply_restarts_the_stage_from_its_checkpoint(tmp_path):
    report = checkpoint_folder(tmp_path / "ck", 10)
    nan_at_28 = [*steps(1, 27), *steps(28, 28, loss=float("nan")), *steps(29, 30)]
    sup = _Supervisor(tmp_path, [
        # the first group reports checkpoint 10, trains into a NaN at step 28, and finishes before
        # its next step boundary: it never applies the rollback the driver's last look decides
        ([{"state": "running", "checkpoints": [report]}, {"state": "finished", "output_checkpoint": "/out/30",
                                                           "rollbacks_applied": []}], nan_at_28),
        ([{"state": "running"}, {"state": "finished", "output_checkpoint": "/out/30b"}], steps(11, 30)),
    ])
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
