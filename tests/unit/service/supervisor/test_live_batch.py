"""The watch writes every running stage's live progress (step, last loss, last-step time) in one
store transaction per cycle (Ledger.update_stages_live), not one per run."""
from __future__ import annotations

from datetime import datetime, timezone

from trainguard.service.adapters.metrics import Snapshot, Target
from trainguard.service.domain.evaluate import WatchConfig
from trainguard.service.supervisor.ingest import Watch
from trainguard.service.supervisor.ledger import LiveRow
from trainguard.service.supervisor.stage import ActiveStage

from tests.unit.service.supervisor.fakes import ledger_in, new_run, steps


def test_update_stages_live_writes_only_the_live_columns_and_skips_missing_stages(tmp_path):
    ledger = ledger_in(tmp_path)
    a, b = new_run(ledger), new_run(ledger)
    name = ledger.stages(a)[0].name
    ledger.update_stage(a, name, state="running", first_loss=3.0)
    at = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    ledger.update_stages_live([LiveRow(a, name, 12, 2.5, at), LiveRow(b, name, 7, None, None),
                               LiveRow("run-gone", name, 1, 1.0, None)])
    (sa,), (sb,) = ledger.stages(a), ledger.stages(b)
    assert (sa.step, sa.last_loss, sa.last_step_at, sa.state, sa.first_loss) == (12, 2.5, at, "running", 3.0)
    assert (sb.step, sb.last_loss, sb.last_step_at) == (7, None, None)


def test_one_cycle_writes_every_stage_s_live_row_in_one_call(tmp_path):
    ledger = ledger_in(tmp_path)
    calls: list[list[LiveRow]] = []
    write = ledger.update_stages_live
    ledger.update_stages_live = lambda rows: (calls.append(list(rows)), write(rows))[1]  # type: ignore[method-assign]
    stages, snaps = [], {}
    for _ in range(3):
        run_id = new_run(ledger)
        name = ledger.stages(run_id)[0].name
        t = Target(run=run_id, stage=name, rank=0, host="fake", port=1)
        stages.append((run_id, ActiveStage(run_id=run_id, name=name, kind="pretrain", index=0, steps=100, targets=[t])))
        snaps[t] = Snapshot(reachable=True, records=steps(1, 20, loss=2.0), step=20)

    class _Source:
        def fetch(self, targets):
            return {t: snaps[t] for t in targets}

    watch = Watch(ledger, executor=None, source=_Source(), config=WatchConfig(),  # type: ignore[arg-type]
                  running=lambda: stages)
    watch.once()
    assert len(calls) == 1 and sorted(r.run_id for r in calls[0]) == sorted(r for r, _ in stages)
    for run_id, active in stages:
        (row,) = ledger.stages(run_id)
        assert (row.step, row.last_loss) == (20, 2.0) and active.live_written[0] == 20
