"""Issue 11, item 4: elastic restart, the supervisor's side. A stage's first group takes its full
size; a restarted group of an elastic stage that got fewer ranks than the stage declares
(WorkerGroup.world_size) is a `world_size_changed` event and a Grafana annotation; the stage's
view says the size its group has; an operator's rollback of a shrunk stage is carried out by a
new group (which grows back where the cluster can place it), never by a control to the shrunk
one. Fake groups, real store, no Ray."""
from __future__ import annotations

import time
from typing import Any

from trainguard.service.domain.detectors import Finding
from trainguard.service.domain.state import RunState
from trainguard.service.supervisor.driver import RunDriver
from trainguard.service.supervisor.executor import OPERATOR_ROLLBACK
from trainguard.workers.contract import ControlKind
from trainguard.workers.spec import parse_pipeline

from tests.unit.service.supervisor.fakes import FakeWorkerGroup, checkpoint_folder, new_run, steps, tiny_spec
from tests.unit.service.supervisor.test_driver import _node_lost, _Supervisor
from tests.unit.service.supervisor.test_executor import _setup


def elastic_spec(steps: int = 30) -> Any:
    d = tiny_spec(steps).model_dump(mode="json")
    d["stages"][0].update(world_size=2, min_world_size=1)
    return parse_pipeline(d)


class _Elastic(_Supervisor):
    """Each scripted group comes up with the next of `sizes` ranks (as WorkerGroup.start places it);
    annotations are recorded."""

    def __init__(self, tmp_path, scripts, sizes: list[int]) -> None:
        super().__init__(tmp_path, scripts)
        self.sizes = list(sizes)
        self.annotations: list[tuple[str, list[str]]] = []
        self.parts.annotate = lambda text, tags: self.annotations.append((text, tags))

    def _start_group(self, **kwargs: Any) -> FakeWorkerGroup:
        g = super()._start_group(**kwargs)
        now = time.time()  # its steps end when it starts, however slow the machine: no hang in sight
        for i, rec in enumerate(g.records):
            rec["time"] = now - 0.001 * (len(g.records) - i)
        g.world_size = self.sizes.pop(0)  # type: ignore[attr-defined]
        g.elastic = ({"world_size": 2, "placed": g.world_size, "micro_batch_size": 4}  # type: ignore[attr-defined]
                     if g.world_size < 2 else None)
        return g

    def run(self, run_id: str) -> RunDriver:
        d = self.drivers[run_id] = RunDriver(self.parts, run_id, elastic_spec())
        d.start()
        d.join(20)
        assert not d.is_alive(), "the driver did not end"
        return d


def _events(sup: _Supervisor, run_id: str, kind: str) -> list[Any]:
    from trainguard.service.db import crud

    with sup.ledger.session() as s:
        return [e for e in crud.list_events(s, run_id=run_id) if e.kind == kind]


def test_a_restart_at_a_smaller_size_is_an_event_and_an_annotation(tmp_path):
    report = checkpoint_folder(tmp_path / "ck", 10)
    sup = _Elastic(tmp_path, [
        ([{"state": "running", "checkpoints": [report]}, _node_lost(15)], steps(1, 15)),
        ([{"state": "running"}, {"state": "finished", "output_checkpoint": "/out/30"}], steps(11, 30)),
    ], sizes=[2, 1])
    run_id = new_run(sup.ledger, steps=30)
    d = sup.run(run_id)
    assert sup.ledger.run_state(run_id) is RunState.COMPLETED
    # the stage's first group takes its full size (or waits for it); a restart may shrink
    assert [g.started_with["shrink"] for g in sup.started] == [False, True]
    (changed,) = _events(sup, run_id, "world_size_changed")
    (inc,) = sup.ledger.stage_incidents(run_id, "pretrain")
    assert changed.result == "shrunk"
    assert {k: changed.detail[k] for k in ("stage", "from", "to", "declared", "min_world_size", "cause", "incident",
                                           "checkpoint", "micro_batch_size")} == {
        "stage": "pretrain", "from": 2, "to": 1, "declared": 2, "min_world_size": 1, "cause": "node_lost",
        "incident": inc.id, "checkpoint": report.ref.path, "micro_batch_size": 4}
    assert changed.detail["placement"]["placed"] == 1
    # the stage's events say the size each group had
    assert [e.detail["world_size"] for e in _events(sup, run_id, "stage_started")] == [2]
    assert [e.detail["world_size"] for e in _events(sup, run_id, "group_restarted")] == [1]
    ((text, tags),) = sup.annotations
    assert "2 -> 1" in text and "node_lost" in text
    assert {"trainguard", "world_size", f"run:{run_id}", "stage:pretrain", "state:shrunk"} <= set(tags)
    assert d.active is None  # the driver ended; while it ran, the stage's view held the group's size


def test_a_group_at_the_size_before_is_no_event_and_a_new_driver_compares_with_the_last_change(tmp_path):
    report = checkpoint_folder(tmp_path / "ck", 10)
    # no change: node lost, restarted at full size
    sup = _Elastic(tmp_path, [
        ([{"state": "running", "checkpoints": [report]}, _node_lost(15)], steps(1, 15)),
        ([{"state": "running"}, {"state": "finished", "output_checkpoint": "/out/30"}], steps(11, 30)),
    ], sizes=[2, 2])
    run_id = new_run(sup.ledger, steps=30)
    sup.run(run_id)
    assert not _events(sup, run_id, "world_size_changed") and not sup.annotations
    # a run whose stage was shrunk to 1 under an earlier driver (needs_attention, then an operator's
    # resume): a first group at 1 is no change; at 2 it grew back
    for first_size, expected in ((1, []), (2, [(1, 2, "grown")])):
        sup = _Elastic(tmp_path / str(first_size), [
            ([{"state": "running"}, {"state": "finished", "output_checkpoint": "/out/30"}], steps(1, 30)),
        ], sizes=[first_size])
        run_id = new_run(sup.ledger, steps=30)
        sup.ledger.event(run_id, "supervisor", "world_size_changed", {"stage": "pretrain", "from": 2, "to": 1},
                         "shrunk")
        sup.ledger.start_stage(run_id, "pretrain")  # it had a group before: this start may shrink
        sup.run(run_id)
        assert sup.started[0].started_with["shrink"] is True
        changes = [(e.detail["from"], e.detail["to"], e.result) for e in _events(sup, run_id, "world_size_changed")]
        assert changes[1:] == expected
        assert len(sup.annotations) == len(expected)


def _operator_rollback(active: Any) -> Finding:
    return Finding(OPERATOR_ROLLBACK, active.last_step, active.last_step,
                   {"requested_checkpoint_step": None, "skip": False, "lr_multiplier": 1.0, "by": "op"})


def test_an_operator_rollback_of_a_shrunk_stage_restarts_the_group_to_grow_it_back(tmp_path):
    ledger, executor, restarter, run_id, active = _setup(tmp_path)
    active.world_size, active.declared_world_size = 1, 2
    handled = executor.handle(run_id, active, _operator_rollback(active), source="operator", actor="op")
    assert not active.group.controls  # not an in-process rollback of the shrunk group
    assert restarter.requests == [(run_id, str(tmp_path / "ck" / "step-00000060"), handled.incident)]
    assert active.pending is not None and active.pending.restart
    inc = ledger.incident(handled.incident)
    assert (inc.action, inc.outcome, inc.skip, inc.lr_multiplier) == ("rollback", "recovering", [], 1.0)


def test_an_operator_rollback_at_full_size_stays_in_process(tmp_path):
    ledger, executor, restarter, run_id, active = _setup(tmp_path)
    active.world_size, active.declared_world_size = 2, 2
    executor.handle(run_id, active, _operator_rollback(active), source="operator", actor="op")
    assert [k for k, _ in active.group.controls] == [ControlKind.ROLLBACK] and not restarter.requests
