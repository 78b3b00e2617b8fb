"""Issue 11, item 4, acceptance: elastic restart. A 2-rank stage with `min_world_size: 1` loses
the node of one rank on a cluster left with CPUs for one rank only: the restart cannot place the
full size, so it restarts at 1 rank from the newest good checkpoint, on the same global samples
(asserted on the sample indices each rank logged: none trained twice, none missing) and with the
loss continuing exactly where it was (the first step after the restart has the loss the 2-rank
group had on the same batch). The change of size is a `world_size_changed` event.

The scenario (elastic_scenario.py) runs a real multi-node Ray cluster (ray.cluster_utils) and the
real supervisor in a process of its own, as test_node_loss.py does.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.multinode.elastic_scenario import BATCH, HANG_AT, NEWEST_CHECKPOINT, STEPS
from tests.integration.multinode.test_node_loss import run_scenario

pytestmark = pytest.mark.integration


def _log(state_dir: Path, run_id: str, rank: int) -> list[dict]:
    from trainguard.workers.runtime.harness import metrics_log_path

    path = metrics_log_path(state_dir, run_id, "pretrain", rank)
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    return [r for r in recs if "batch_index" in r and "step_seconds" in r]


def _kept(records: list[dict]) -> list[dict]:
    """The steps that count, in the order a rank's log has them: a step that goes back (a restart
    from a checkpoint) discards the steps from it on, which the run no longer has."""
    kept: list[dict] = []
    for r in records:
        while kept and int(kept[-1]["step"]) >= int(r["step"]):
            kept.pop()
        kept.append(r)
    return kept


def test_full_size_unavailable_restarts_at_the_smaller_size_on_the_same_global_samples(tmp_path):
    state_dir = tmp_path / "state"
    r = run_scenario(state_dir, "tests.integration.multinode.elastic_scenario")
    print(json.dumps({k: v for k, v in r.items() if k not in ("events",)}, indent=1, default=str))
    assert r["run_state"] == "completed"
    assert (r["first_world_size"], r["first_ranks"]) == (2, 2)
    # the full size could not be placed: the restarted group has 1 rank, and every view says so
    assert (r["restart_world_size"], r["restart_ranks"]) == (1, 1)
    assert r["stage_view"] == {"world_size": 1, "declared": 2, "targets": 1}
    el = r["restart_elastic"]
    assert el["world_size"] == 2 and el["placed"] == 1 and el["largest_fit"] == 1
    assert el["micro_batch_size"] == BATCH // 2  # micro-steps of the 2-rank share: the global batch kept
    assert r["final_checkpoint_state"]["world_size"] == 1  # what the harness trained with

    acted = [i for i in r["incidents"] if i["action"] != "notify"]
    assert [i["kind"] for i in acted] == ["node_lost"] and acted[0]["outcome"] == "resolved"
    ck = acted[0]["rollback_to_step"]
    assert ck == NEWEST_CHECKPOINT  # the newest good one: the 2-rank group trained up to step HANG_AT
    changes = [e for e in r["events"] if e["kind"] == "world_size_changed"]
    assert len(changes) == 1 and changes[0]["result"] == "shrunk"
    d = changes[0]["detail"]
    assert (d["from"], d["to"], d["declared"], d["min_world_size"], d["cause"]) == (2, 1, 2, 1, "node_lost")
    assert d["checkpoint"].endswith(f"step-{ck:08d}")

    rank0, rank1 = _log(state_dir, r["run_id"], 0), _log(state_dir, r["run_id"], 1)
    assert [int(x["step"]) for x in rank1] == list(range(1, HANG_AT + 1))  # then it hung; its node went
    kept = _kept(rank0)
    # every batch once, in order, none missing (no skip: a node loss skips no data)
    assert [int(x["batch_index"]) for x in kept] == list(range(STEPS))
    assert [int(x["step"]) for x in kept] == list(range(1, STEPS + 1))
    # up to the checkpoint, 2 ranks (rank 0 half of each global batch, rank 1 the other half);
    # after it, rank 0 alone on the whole global batch
    by_step1 = {int(x["step"]): x for x in rank1}
    trained: list[int] = []
    for x in kept:
        s, b = int(x["step"]), int(x["batch_index"])
        if s <= ck:
            assert x["samples"] == [b * BATCH, b * BATCH + BATCH // 2], x
            other = by_step1[s]
            assert int(other["batch_index"]) == b and other["samples"] == [b * BATCH + BATCH // 2, (b + 1) * BATCH]
            trained += [*range(*x["samples"]), *range(*other["samples"])]
        else:
            assert x["samples"] == [b * BATCH, (b + 1) * BATCH], x
            trained += list(range(*x["samples"]))
    assert sorted(trained) == trained == list(range(STEPS * BATCH))  # each global sample once, in order
    # rank 1 trained nothing after the restart (its node is gone, the group has 1 rank)
    restart_t = min(float(x["time"]) for x in kept if int(x["step"]) > ck)
    assert max(float(x["time"]) for x in rank1) < restart_t

    # the loss continues: the restarted group's first step trains batch `ck` on the checkpoint's
    # weights, as the 2-rank group did before the node went: its loss is the mean of the two
    # ranks' losses there (micro-steps of the same 4 samples each), not the initial loss
    first_after = next(x for x in kept if int(x["step"]) == ck + 1)
    lost0 = next(x for x in rank0 if int(x["step"]) == ck + 1 and float(x["time"]) < restart_t)
    lost1 = by_step1[ck + 1]
    assert float(first_after["loss"]) == pytest.approx((float(lost0["loss"]) + float(lost1["loss"])) / 2, rel=1e-4)
    initial = float(kept[0]["loss"])
    assert float(first_after["loss"]) < initial - 0.5 * (initial - float(kept[ck - 1]["loss"]))
    assert float(kept[-1]["loss"]) < float(first_after["loss"])
