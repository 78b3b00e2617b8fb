"""A run under the supervisor whose checkpoints live on a real S3-compatible server (moto, the
`s3_server` fixture): the Ray workers write them to the bucket, a loss spike is rolled back to a
checkpoint read back from the bucket, and the run completes with its output there.

The workers reach the server through the environment: tests/conftest.py sets AWS_ENDPOINT_URL
and the credentials before Ray starts (worker processes inherit them) and before
workers/group.py is imported (TrainWorker's runtime_env forwards AWS_* / FSSPEC_* variables,
which is what carries them to the actors of a Ray cluster the supervisor did not start)."""
from __future__ import annotations

import pytest

from trainguard.workers.runtime.checkpoint import list_checkpoints, read_verified, stage_root

from tests.integration.supervisor.harness import incidents, running_controller, tiny_pipeline, wait_state

pytestmark = pytest.mark.integration


def test_a_run_on_s3_checkpoints_rolls_back_a_spike_and_completes(ray_session, s3_server, tmp_state):
    root = s3_server.prefix("run")
    # few checkpoints: every write and retention pass is a round of requests to the server
    spec = tiny_pipeline(steps=100, every=20, keep_last=3,
                         faults=[{"kind": "loss_spike", "at_step": 60, "duration": 6}])
    spec = spec.model_copy(update={"checkpoint": spec.checkpoint.model_copy(update={"storage": root})})
    with running_controller(tmp_state) as ctl:
        run_id = ctl.submit(spec, actor="test")
        assert wait_state(ctl, run_id) == "completed"
        incs = incidents(ctl, run_id)
        rows = ctl.catalog.ledger.checkpoints(run_id, "pretrain")
    spikes = [i for i in incs if i.kind == "loss_spike"]
    assert len(spikes) == 1, [(i.kind, i.onset_step, i.action) for i in incs]
    inc = spikes[0]
    assert inc.action == "rollback" and inc.outcome == "resolved"
    assert inc.rollback_to_step is not None and inc.rollback_to_step < inc.onset_step
    assert not [i for i in incs if i.kind == "checkpoint_corrupt"]
    # every checkpoint the workers reported is in the bucket, and the newest verifies against the
    # hashes the supervisor recorded
    assert rows and all(r.path.startswith(f"{root}/{run_id}/pretrain/step-") for r in rows)
    final = max(rows, key=lambda r: r.step)
    assert final.step == 100
    read_verified(ctl.catalog.ledger.ref_of(final))
    # retention ran in the bucket: keep_last 3 (plus what a recent anomaly protects)
    steps = [m["step"] for m in list_checkpoints(stage_root(root, run_id, "pretrain"))]
    assert steps[-1] == 100 and len(steps) <= 5, steps
