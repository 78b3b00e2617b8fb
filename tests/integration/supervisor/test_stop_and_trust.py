"""Stop means stopped in every state; checkpoint bytes are trusted only against the hashes the
workers reported; retention never looks like corruption. Real Ray workers, real SQLite."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
from pathlib import Path

import pytest

from trainguard.service import errors
from trainguard.service.controller import Controller
from trainguard.service.supervisor.ingest import Watch
from trainguard.service.db import crud
from trainguard.workers.runtime.checkpoint import file_digest
from tests.conftest import wait_for
from tests.integration.supervisor.harness import (assert_nothing_survives, incidents, run_state, running_controller,
                                                  tiny_pipeline, wait_state)

pytestmark = pytest.mark.integration

def _step(ctl: Controller, run_id: str) -> int:
    d = ctl.drivers.get(run_id)
    return d.active.last_step if d and d.active else -1


@pytest.mark.parametrize("state", ["paused", "recovering"])  # running: test_rest_control
def test_stop_leaves_no_actor_driver_target_or_running_stage(ray_session, tmp_state, groups, state):
    faults = [{"kind": "hang", "at_step": 25}] if state == "recovering" else []
    spec = tiny_pipeline(steps=5000, every=10, faults=faults, extra={"step_delay": 0.01})
    with running_controller(tmp_state) as ctl:
        run_id = ctl.submit(spec, actor="test")
        wait_for(lambda: _step(ctl, run_id) >= 12, 90, what="step 12")
        if state == "paused":
            ctl.pause(run_id, actor="test")
        if state == "recovering":  # the hang is detected, the group restarted
            wait_state(ctl, run_id, ("recovering",), timeout=60)
        assert run_state(ctl, run_id) == state
        ctl.stop(run_id, actor="test")
        assert run_state(ctl, run_id) == "stopped"
        assert_nothing_survives(ctl, run_id, groups[run_id])
        with ctl.session() as s:
            assert crud.get_stage(s, run_id=run_id, name="pretrain").state == "stopped"


def test_stop_while_the_group_is_restarting_kills_the_new_group(ray_session, tmp_state, groups, monkeypatch):
    """Forces the interleaving the review saw: stop arrives while a restart brings a new group up."""
    arrived, release = threading.Event(), threading.Event()
    real = Watch.targets_of
    calls: list[int] = []

    def slow_second_start(self, active, group):
        calls.append(1)
        if len(calls) == 2:  # the restart's group: hold it here until the stop went through
            arrived.set()
            release.wait(60)
        return real(self, active, group)

    monkeypatch.setattr(Watch, "targets_of", slow_second_start)
    spec = tiny_pipeline(steps=5000, every=10, world_size=2,
                         faults=[{"kind": "worker_crash", "at_step": 15, "rank": 1}], extra={"step_delay": 0.01})
    with running_controller(tmp_state) as ctl:
        run_id = ctl.submit(spec, actor="test")
        assert arrived.wait(120), "the restart began"
        assert run_state(ctl, run_id) == "recovering"
        ctl.stop(run_id, actor="test")
        release.set()
        assert_nothing_survives(ctl, run_id, groups[run_id])
        assert len(groups[run_id]) == 2
        assert run_state(ctl, run_id) == "stopped"


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_pickle(ckpt: Path, marker: Path) -> None:
    """Someone who can write checkpoint storage replaces extra.pt with code and fixes the manifest,
    swapping the folder in one rename (a half-planted folder would be plain corruption)."""
    forged = ckpt.with_name(".forged-" + ckpt.name)
    shutil.copytree(ckpt, forged)
    data = pickle.dumps({"kl_coef": _Payload(str(marker))})
    (forged / "extra.pt").write_bytes(data)
    m = json.loads((forged / "manifest.json").read_text())
    m["files"]["extra.pt"] = file_digest(data)  # what the writer records (BLAKE3)
    (forged / "manifest.json").write_text(json.dumps(m))
    os.rename(ckpt, ckpt.with_name(".orig-" + ckpt.name))
    os.rename(forged, ckpt)


def test_tampered_checkpoint_never_runs_code_on_rollback_and_unreported_ones_are_never_registered(
        ray_session, tmp_state, tmp_path):
    marker = tmp_path / "pwned"
    spec = tiny_pipeline(steps=5000, every=10, keep_last=50, extra={"step_delay": 0.01})
    with running_controller(tmp_state) as ctl:
        run_id = ctl.submit(spec, actor="test")
        def registered() -> dict:
            with ctl.session() as s:
                return {c.step: c for c in crud.list_checkpoints(s, run_id=run_id, include_deleted=False)}

        rows = wait_for(lambda: (r := registered()) and {10, 20, 30} <= set(r) and r, 90,
                        what="checkpoints 10-30 reported and registered")
        assert all(r.files and "manifest.json" in r.files for r in rows.values())
        _plant_pickle(Path(rows[20].path), marker)
        # a folder the workers never reported: the supervisor does not register it
        fake = Path(rows[10].path).parent / "step-00000015"
        fake.mkdir()
        (fake / "manifest.json").write_text(json.dumps({"schema_version": 1, "step": 15, "files": {}}))
        # refused: found replaced now, or already by the periodic re-verification
        with pytest.raises(errors.Conflict, match="no longer holds the bytes|was deleted"):
            ctl.rollback(run_id, checkpoint_id=rows[20].id, actor="test")
        res = ctl.rollback(run_id, checkpoint_id=rows[30].id, actor="test", skip=False, lr_multiplier=1.0)
        assert res["rollback_to_step"] == 30
        wait_state(ctl, run_id, ("running",), timeout=60)
        with ctl.session() as s:
            inc = crud.get_incident(s, incident_id=res["incident"])
            steps = {c.step for c in crud.list_checkpoints(s, run_id=run_id)}
            assert crud.get_checkpoint(s, run_id=run_id, checkpoint_id=rows[20].id).deleted_at is not None
        assert inc.skip == [] and inc.lr_multiplier == pytest.approx(1.0)
        assert 15 not in steps
        ctl.stop(run_id, actor="test")
    assert not marker.exists()
    assert not [i for i in incidents(ctl, run_id) if i.kind == "checkpoint_corrupt"]


def test_retention_on_a_healthy_run_is_never_reported_as_corruption(ray_session, tmp_state):
    spec = tiny_pipeline(steps=160, world_size=2, every=5, keep_last=2)
    with running_controller(tmp_state) as ctl:
        run_id = ctl.submit(spec, actor="test")
        assert wait_state(ctl, run_id) == "completed"
        with ctl.session() as s:
            rows = crud.list_checkpoints(s, run_id=run_id)
            live = crud.list_checkpoints(s, run_id=run_id, include_deleted=False)
    assert len(rows) >= 30, "every checkpoint was reported"
    assert not [i for i in incidents(ctl, run_id) if i.kind == "checkpoint_corrupt"]
    assert not [r for r in rows if r.bad_reason], [(r.step, r.bad_reason) for r in rows if r.bad_reason]
    deleted = [r for r in rows if r.deleted_at is not None]
    assert deleted and all(r.healthy for r in deleted), "deleted by retention: gone, not unhealthy"
    assert len(live) <= 3 and max(r.step for r in live) == 160
