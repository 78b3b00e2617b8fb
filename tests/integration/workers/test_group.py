"""WorkerGroup on real Ray: resume across groups, faults, controls, metrics over HTTP."""
from __future__ import annotations

import time

import pytest
import torch

from tests.conftest import wait_for
from trainguard.workers.contract import ControlKind, MetricName
from trainguard.workers.group import WorkerGroup
from trainguard.workers.runtime.checkpoint import list_checkpoints, load_checkpoint, stage_root
from trainguard.workers.spec import parse_pipeline

from ._helpers import history, scrape, tiny_pipeline, value

pytestmark = pytest.mark.integration


@pytest.fixture
def groups():
    made: list[WorkerGroup] = []
    yield made
    for g in made:
        g.shutdown()


def _group(groups, state_dir, pipeline, **kw) -> WorkerGroup:
    g = WorkerGroup(run_id="r1", spec=parse_pipeline(pipeline), stage_name="pretrain", state_dir=state_dir, **kw)
    groups.append(g)
    g.start()
    return g


REPORTED: dict[int, dict] = {}  # id(group) -> {step: CheckpointRef}: what rank 0 reported, as the supervisor sees it


def _poll(g: WorkerGroup) -> dict:
    p = g.poll()
    REPORTED.setdefault(id(g), {}).update({r.step: r.ref for r in p["checkpoints"]})
    return p


def _reported(g: WorkerGroup) -> dict:
    _poll(g)
    return REPORTED.get(id(g), {})


def _until(g: WorkerGroup, states: tuple[str, ...], timeout: float = 120.0) -> dict:
    return wait_for(lambda: (p := _poll(g)) and p["state"] in states and p, timeout, interval=0.2,
                    what=f"group state in {states}")


def _labels(rank: int) -> dict:
    return {"run": "r1", "stage": "pretrain", "rank": str(rank)}


def test_two_rank_group_resumed_from_a_checkpoint_matches_the_uninterrupted_run(ray_session, tmp_path, groups):
    pipeline = tiny_pipeline(steps=12, world_size=2, checkpoint={"every": 4, "keep_last": 10})
    full = _group(groups, tmp_path / "a", pipeline, skip=[[2, 4]])
    done = _until(full, ("finished", "failed"))
    assert done["state"] == "finished", done
    ck = _reported(full)
    assert sorted(ck) == [4, 8, 12], "every checkpoint rank 0 wrote was reported, the final one included"
    resumed = _group(groups, tmp_path / "b", pipeline, resume_from=ck[8])
    again = _until(resumed, ("finished", "failed"))
    assert again["state"] == "finished", again
    assert done["output_checkpoint"] == ck[12].path and again["output_checkpoint"] == _reported(resumed)[12].path
    a = load_checkpoint(ck[12])
    b = load_checkpoint(_reported(resumed)[12])
    assert b["state"]["skip"] == [[2, 4]]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(), b["optimizer"]["state"][0].values()))


def test_worker_crash_kills_the_actor_and_a_restart_does_not_crash_again(ray_session, tmp_path, groups):
    pipeline = tiny_pipeline(steps=10, world_size=2, checkpoint={"every": 4, "keep_last": 10},
                             faults=[{"kind": "worker_crash", "at_step": 9, "rank": 1}])
    g = _group(groups, tmp_path, pipeline)
    failed = _until(g, ("failed", "finished"))
    assert failed["state"] == "failed" and failed["failed_rank"] == 1, failed
    assert failed["ranks"][1]["alive"] is False and "died" in failed["error"]
    g.shutdown()
    newest = max(_reported(g))
    assert newest == 8
    restarted = _group(groups, tmp_path, pipeline, resume_from=_reported(g)[newest])
    assert _until(restarted, ("failed", "finished"))["state"] == "finished"


def test_hang_slow_and_gpu_xid_show_on_metrics(ray_session, tmp_path, groups):
    pipeline = tiny_pipeline(steps=30, faults=[
        {"kind": "slow", "at_step": 2, "duration": 3, "factor": 0.3},
        {"kind": "gpu_xid", "at_step": 4},
        {"kind": "hang", "at_step": 8},
    ])
    g = _group(groups, tmp_path, pipeline)
    (ep,) = g.endpoints()
    L = _labels(0)
    m = wait_for(lambda: (s := scrape(ep["host"], ep["port"])) and value(s, MetricName.STEP, **L) == 8 and s, 120, what="step 8")
    # slow: three steps of >= 0.3 s each
    assert value(m, "trainguard_step_seconds_sum", **L) >= 0.9
    assert value(m, "trainguard_step_seconds_bucket", le="0.1", **L) <= 5
    # gpu_xid through the fake NVML
    assert value(m, "trainguard_gpu_xid_errors_total", provider="fake-nvml", **L) == 1
    # hang: the heartbeat stops while the process stays alive and answers
    beat = value(m, MetricName.LAST_STEP_TS, **L)
    wait_for(lambda: time.time() - beat > 1.0, 5, what="a second to pass")
    m2 = scrape(ep["host"], ep["port"])
    assert value(m2, MetricName.LAST_STEP_TS, **L) == beat and value(m2, MetricName.STEP, **L) == 8
    p = _poll(g)
    assert p["state"] == "running" and p["ranks"][0]["alive"] and p["ranks"][0]["step"] == 8


def test_pause_resume_lr_multiplier_rollback_and_stop_agree_across_ranks(ray_session, tmp_path, groups):
    pipeline = tiny_pipeline(steps=400, world_size=2, step_delay=0.02, checkpoint={"every": 5, "keep_last": 50})
    g = _group(groups, tmp_path, pipeline)
    eps = g.endpoints()
    step_of = lambda r: value(scrape(eps[r]["host"], eps[r]["port"]), MetricName.STEP, **_labels(r))  # noqa: E731
    wait_for(lambda: step_of(0) >= 12, 120, what="step 12")

    g.control(ControlKind.PAUSE)
    wait_for(lambda: all(value(scrape(e["host"], e["port"]), MetricName.WORKER_PAUSED, **_labels(e["rank"])) == 1 for e in eps),
             10, what="both ranks paused")
    paused_at = step_of(0)
    assert step_of(1) == paused_at and _poll(g)["state"] == "paused"
    t = time.monotonic()
    while time.monotonic() - t < 0.5:  # observe for a while: no rank advances
        assert step_of(0) == paused_at and step_of(1) == paused_at

    lr_before = value(scrape(eps[0]["host"], eps[0]["port"]), MetricName.LEARNING_RATE, **_labels(0))
    g.control(ControlKind.LR_MULTIPLIER, {"value": 0.01})
    g.control(ControlKind.RESUME)
    wait_for(lambda: step_of(0) > paused_at + 2, 10, what="steps after resume")
    lr_after = value(scrape(eps[1]["host"], eps[1]["port"]), MetricName.LEARNING_RATE, **_labels(1))
    assert lr_after < lr_before / 50

    ck = _reported(g)[10]
    now = step_of(0)
    g.control(ControlKind.ROLLBACK, {"checkpoint": ck.to_dict(), "skip": [[10, 20]], "lr_multiplier": 0.5})
    wait_for(lambda: step_of(0) < now, 10, what="trainguard_step to go back")
    wait_for(lambda: any(r["step"] == 11 and r["batch_index"] == 20
                         for r in history(eps[1]["host"], eps[1]["port"], since=11)), 10, what="replay from batch 20")

    g.control(ControlKind.STOP)
    stopped = _until(g, ("stopped", "failed"), timeout=60)
    assert stopped["state"] == "stopped", stopped
    # the stop wrote a checkpoint at the step both ranks stopped on; the abandoned
    # timeline's checkpoints (after step 10, before the rollback) are gone
    (at,) = {r["step"] for r in stopped["ranks"]}
    ckpts = list_checkpoints(stage_root(tmp_path / "checkpoints", "r1", "pretrain"))
    assert ckpts[-1]["step"] == at
    assert all(c["batch_cursor"] == c["step"] + 10 for c in ckpts if c["step"] > 10)  # written after the rollback


def test_a_reattached_group_stops_although_its_old_supervisor_reached_only_one_rank(ray_session, tmp_path, groups):
    """Detached ranks; the old supervisor's pause reached rank 1 only (killed mid-delivery). A new
    `attach_group` finds the same actors, numbers its controls after every seq they saw, and has
    the lone message dropped everywhere: its STOP is agreed and the group stops by itself."""
    import ray

    from tests.integration.supervisor.harness import reap_detached_actors
    from trainguard.workers.contract import Control
    from trainguard.workers.group import attach_group, use_detached_groups, warm_pool

    pipeline = tiny_pipeline(steps=4000, world_size=2, step_delay=0.02)
    warm_pool().close()  # the idle spares earlier tests left are not detached: a group must not take them
    use_detached_groups(True)
    try:
        g = _group(groups, tmp_path, pipeline)
        eps = g.endpoints()
        step_of = lambda r: value(scrape(eps[r]["host"], eps[r]["port"]), MetricName.STEP, **_labels(r))  # noqa: E731
        wait_for(lambda: step_of(0) >= 5, 120, what="step 5")
        g.control(ControlKind.LR_MULTIPLIER, {"value": 0.5})  # seq 1, on both ranks
        lone = Control(ControlKind.PAUSE, 2).to_dict()
        ray.get(g._actors[1].control.remote(lone), timeout=10)  # seq 2 reaches rank 1 only
        time.sleep(0.5)
        assert step_of(0) > 5 and _poll(g)["state"] == "running", "a message on one rank applies nowhere"
        again = attach_group(run_id="r1", spec=parse_pipeline(pipeline), stage_name="pretrain", state_dir=tmp_path)
        pids = [ray.get(a.identity.remote(), timeout=10)["pid"] for a in g._actors]
        assert again is not None and [i["pid"] for i in again.identities] == pids
        assert sorted(i["control_seq"] for i in again.identities) == [1, 2]
        groups.append(again)
        assert again.control(ControlKind.STOP) == 3
        stopped = _until(again, ("stopped", "failed"), timeout=60)
        assert stopped["state"] == "stopped", stopped
    finally:
        use_detached_groups(False)
        warm_pool().close()
        reap_detached_actors()


def test_the_pool_replaces_the_spares_a_group_took_once_every_rank_is_past_its_start(ray_session, tmp_path, groups,
                                                                                     monkeypatch):
    """Replacements started at once took the CPU from the group starting beside them: the pool
    refills when the group's poll finds every rank has trained a step, not when spares are taken.
    The fallback refill (REFILL_FALLBACK_S after the take, for a group nobody polls; its own unit
    test in test_group_state.py) is put out of reach: under the suite's load this group's start
    took longer than its 5 s, and the refill then came before any step, as the fallback should."""
    from trainguard.workers import group as group_mod
    from trainguard.workers.group import warm_pool

    monkeypatch.setattr(group_mod, "REFILL_FALLBACK_S", 600.0)
    pool = warm_pool()
    pool.refill()
    wait_for(lambda: pool.idle() == pool.size, 120, what="the pool full")
    g = _group(groups, tmp_path, tiny_pipeline(steps=400, world_size=2, step_delay=0.02))
    assert pool.idle() == pool.size - 2  # taken, not yet replaced
    p = _until(g, ("running",))
    # the group's poll (as its driver polls it) refills once every rank trained a step
    wait_for(lambda: _poll(g) and pool.idle() == pool.size, 120, interval=0.2, what="the pool refilled")
    assert all(r["state"] == "running" and r["step"] >= 1 for r in _poll(g)["ranks"]), p
    g.control(ControlKind.STOP)
    _until(g, ("stopped",))
