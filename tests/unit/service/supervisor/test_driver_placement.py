"""Issue 11, item 1: a worker group that cannot be placed (its placement group not ready in
time) is an `insufficient_resources` incident naming what was asked and what is free; the
run needs an operator — never a hang, never a driver error. Fake groups, real store, no Ray."""
from __future__ import annotations

from typing import Any

from trainguard.service.domain.state import RunState
from trainguard.workers.group import InsufficientResources

from tests.unit.service.supervisor.fakes import checkpoint_folder, new_run, steps
from tests.unit.service.supervisor.test_driver import _node_lost, _Supervisor

EVIDENCE = {"group": "run r stage pretrain", "asked": {"bundles": 2, "per_bundle": {"CPU": 1.0}, "strategy": "PACK",
                                                       "total": {"CPU": 2.0}},
            "free": {"CPU": 1.0}, "cluster": {"CPU": 4.0}, "waited_s": 0.1}
UNPLACEABLE = "unplaceable"


class _Tight(_Supervisor):
    """Scripts equal to UNPLACEABLE make `start_group` raise as WorkerGroup.start does."""

    def _start_group(self, **kwargs: Any) -> Any:
        if self.scripts and self.scripts[0] == UNPLACEABLE:
            self.scripts.pop(0)
            raise InsufficientResources("run r stage pretrain: needs 2 x {'CPU': 1.0} ...", dict(EVIDENCE))
        return super()._start_group(**kwargs)


def test_a_first_group_that_cannot_be_placed_is_an_incident_and_the_run_needs_an_operator(tmp_path):
    sup = _Tight(tmp_path, [UNPLACEABLE])  # type: ignore[list-item]
    run_id = new_run(sup.ledger, steps=30)
    sup.run(run_id)
    (inc,) = sup.ledger.stage_incidents(run_id, "pretrain")
    assert (inc.kind, inc.action, inc.outcome) == ("insufficient_resources", "needs_attention", "needs_attention")
    assert inc.evidence["asked"]["total"] == {"CPU": 2.0} and inc.evidence["free"] == {"CPU": 1.0}
    assert "needs 2" in inc.evidence["error"]
    assert sup.ledger.run_state(run_id) is RunState.NEEDS_ATTENTION
    assert not sup.started


def test_a_restart_that_cannot_be_placed_gives_the_recovery_up_to_an_operator(tmp_path):
    report = checkpoint_folder(tmp_path / "ck", 10)
    sup = _Tight(tmp_path, [([{"state": "running", "checkpoints": [report]}, _node_lost(15)], steps(1, 15)),
                            UNPLACEABLE])  # type: ignore[list-item]
    run_id = new_run(sup.ledger, steps=30)
    sup.run(run_id)
    assert len(sup.started) == 1 and sup.started[0].closed
    lost, unplaced = sorted(sup.ledger.stage_incidents(run_id, "pretrain"), key=lambda i: i.id)
    assert (lost.kind, lost.action, lost.outcome) == ("node_lost", "restart", "needs_attention")
    assert (unplaced.kind, unplaced.action, unplaced.outcome) == (
        "insufficient_resources", "needs_attention", "needs_attention")
    assert sup.ledger.run_state(run_id) is RunState.NEEDS_ATTENTION
