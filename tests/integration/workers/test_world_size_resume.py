"""A checkpoint saved by 2 ranks continues at 1 rank on exactly the same global samples (real
Ray): the batch index after the resume is the same, the two ranks' shares of it together are
the one rank's batch, and the first loss after the resume is the mean of the two ranks' losses
(no update has happened yet: the same weights see the same samples)."""
from __future__ import annotations

import json

import pytest

from trainguard.workers.data import sample_indices
from trainguard.workers.group import WorkerGroup
from trainguard.workers.runtime.harness import metrics_log_path
from trainguard.workers.spec import parse_pipeline

from tests.conftest import wait_for

from ._helpers import tiny_pipeline

pytestmark = pytest.mark.integration


def _run(state_dir, pipeline, **kw) -> tuple[WorkerGroup, dict]:
    g = WorkerGroup(run_id="r1", spec=parse_pipeline(pipeline), stage_name="pretrain", state_dir=state_dir, **kw)
    g.start()
    reports: dict = {}

    def finished():
        p = g.poll()
        reports.update({r.step: r.ref for r in p["checkpoints"]})
        return p["state"] in ("finished", "failed") and p

    done = wait_for(finished, 120, interval=0.2, what="the group to finish")
    assert done["state"] == "finished", done
    return g, reports


def _log(state_dir, rank: int) -> dict[int, dict]:
    lines = metrics_log_path(state_dir, "r1", "pretrain", rank).read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def test_a_two_rank_checkpoint_resumes_at_one_rank_on_the_same_global_samples(ray_session, tmp_path):
    two = tiny_pipeline(steps=12, world_size=2, batch_size=8, checkpoint={"every": 4, "keep_last": 10})
    one = tiny_pipeline(steps=12, world_size=1, batch_size=8, checkpoint={"every": 4, "keep_last": 10})
    g2, reports = _run(tmp_path / "two", two, skip=[[2, 4]])
    g2.shutdown()
    g1, _ = _run(tmp_path / "one", one, resume_from=reports[8])
    g1.shutdown()
    r0, r1, solo = _log(tmp_path / "two", 0), _log(tmp_path / "two", 1), _log(tmp_path / "one", 0)
    assert min(solo) == 9, "the one-rank run starts after the checkpoint"
    batch = solo[9]["batch_index"]
    assert batch == r0[9]["batch_index"] == r1[9]["batch_index"]
    shares = sample_indices(batch, 0, 2, 8) + sample_indices(batch, 1, 2, 8)
    assert sorted(shares) == sample_indices(batch, 0, 1, 8)
    assert [solo[s]["batch_index"] for s in range(9, 13)] == [r0[s]["batch_index"] for s in range(9, 13)]
    assert solo[9]["loss"] == pytest.approx((r0[9]["loss"] + r1[9]["loss"]) / 2, rel=1e-5)
