"""Lock order: quarantining a corrupt checkpoint never waits for the run's lock (no Ray needed)."""
from __future__ import annotations

import json
import threading

import pytest

from trainguard.service.config import Settings
from trainguard.service.controller import Controller
from trainguard.service.db import crud

pytestmark = pytest.mark.integration


def _sha(b: bytes) -> dict:  # a file's recorded entry, as a worker reports it
    from trainguard.workers.runtime.checkpoint import file_digest

    return file_digest(b)


def test_quarantine_while_a_decision_holds_the_run_lock_does_not_wait_for_it(tmp_state):
    """The deadlock a full-suite run found: the checkpoints job verified under the catalog's lock
    and wanted the run lock to quarantine; the watch held the run lock (deciding a rollback) and
    wanted the catalog's lock."""
    ctl = Controller(Settings(state_dir=tmp_state, environment="development"))
    folder = tmp_state / "ck" / "step-00000040"
    folder.mkdir(parents=True)
    manifest = json.dumps({"step": 40}).encode()
    (folder / "manifest.json").write_bytes(manifest)
    (folder / "model.pt").write_bytes(b"flipped bytes")
    files = {"manifest.json": _sha(manifest), "model.pt": _sha(b"the bytes the worker wrote")}
    with ctl.session() as s:
        run_id = crud.create_run(s, name="t", spec_json="{}", actor="test").id
        row = crud.upsert_checkpoint(s, run_id=run_id, stage_name="pretrain", step=40, batch_cursor=40,
                                     path=str(folder), verified=True, healthy=True, files=files)
    done = threading.Event()

    def checkpoints_job() -> None:
        ctl.catalog.scan([run_id])
        done.set()

    with ctl.lock(run_id):  # a decision in flight on another thread
        t = threading.Thread(target=checkpoints_job, daemon=True)
        t.start()
        assert done.wait(10), "quarantine waited for the run lock"
    with ctl.session() as s:
        assert crud.get_checkpoint(s, run_id=run_id, checkpoint_id=row.id).bad_reason
        assert [i.kind for i in crud.list_incidents(s, run_id=run_id)] == ["checkpoint_corrupt"]
