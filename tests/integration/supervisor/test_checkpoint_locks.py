"""Lock order: quarantining a corrupt checkpoint never waits for the run's lock (no Ray needed)."""
from __future__ import annotations

import threading

import pytest

from trainguard.service.config import Settings
from trainguard.service.controller import Controller
from trainguard.service.db import crud

pytestmark = pytest.mark.integration


def test_quarantine_under_the_checkpoint_lock_does_not_wait_for_a_decision_holding_the_run_lock(tmp_state):
    """The deadlock a full-suite run found: the checkpoints job held `_ckpt_lock` and wanted the run
    lock to quarantine; the watch held the run lock (deciding a rollback) and wanted `_ckpt_lock`."""
    ctl = Controller(Settings(state_dir=tmp_state, environment="development"))
    with ctl.session() as s:
        run_id = crud.create_run(s, name="t", spec_json="{}", actor="test").id
        row = crud.upsert_checkpoint(s, run_id=run_id, stage_name="pretrain", step=40, batch_cursor=40,
                                     path="/ck/40", verified=True, healthy=True, files={"model.pt": {}})
    done = threading.Event()

    def checkpoints_job() -> None:
        with ctl._ckpt_lock:
            ctl._checkpoint_bad(run_id, "pretrain", row.id, "model.pt: checksum mismatch", files=row.files)
        done.set()

    with ctl.lock(run_id):  # a decision in flight on another thread
        t = threading.Thread(target=checkpoints_job, daemon=True)
        t.start()
        assert done.wait(10), "quarantine waited for the run lock"
    with ctl.session() as s:
        assert crud.get_checkpoint(s, run_id=run_id, checkpoint_id=row.id).bad_reason
        assert [i.kind for i in crud.list_incidents(s, run_id=run_id)] == ["checkpoint_corrupt"]
