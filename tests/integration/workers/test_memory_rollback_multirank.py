"""A rollback on two gloo ranks (processes, no Ray) restored from the ranks' host-memory copies
trains exactly as one read back from the files, and the ranks agree on where it came from."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from trainguard.workers.contract import Control, ControlKind
from trainguard.workers.spec import parse_pipeline
from trainguard.workers.stages.pretrain import PretrainStage

from tests.support import flat_state, spawn_gloo_ranks

pytestmark = pytest.mark.integration

WORLD = 2
STEPS = 24


def _spec(in_memory: int):
    # dropout on: the global RNG is used in every step, so its restore is part of an exact rollback
    return parse_pipeline({
        "name": "mem", "seed": 5, "model": {"n_layer": 1, "n_head": 2, "d_model": 16, "seq_len": 16, "dropout": 0.1},
        "checkpoint": {"every": 5, "keep_last": 5, "in_memory": in_memory},
        "stages": [{"name": "pretrain", "kind": "pretrain", "steps": STEPS, "world_size": WORLD, "batch_size": 8,
                    "lr": 3e-3, "warmup_steps": 2, "eval_every": 100, "parallel": {"strategy": "ddp"}}]})


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    import trainguard.workers.runtime.harness as harness_mod
    from trainguard.workers.runtime.distributed import Dist
    from trainguard.workers.runtime.harness import Harness, make_context

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    d = Dist.init(rank=rank, world_size=WORLD, addr="127.0.0.1", port=port, device=torch.device("cpu"), timeout_s=60)
    files_read: list[str] = []
    real = harness_mod.load_checkpoint

    def counting(ref, **kw):
        files_read.append(ref.path)
        return real(ref, **kw)

    harness_mod.load_checkpoint = counting
    results = {}
    for in_memory in (0, 2):
        torch.manual_seed(1000 + rank)
        spec = _spec(in_memory)
        ctx = make_context(spec, "pretrain", run_id="r", rank=rank, world_size=WORLD, device=torch.device("cpu"))
        sent: list[bool] = []

        def hook(h) -> None:
            if h.step == 17 and not sent:  # back to step 10: the older of the two copies kept
                sent.append(True)
                h.writer.wait()
                ref = [next(r for r in h.own.values() if r.path.endswith("step-00000010")).to_dict()
                       if rank == 0 else None]
                dist.broadcast_object_list(ref, src=0)
                h.inbox.put(Control(ControlKind.ROLLBACK, seq=1, payload={"checkpoint": ref[0], "skip": [[10, 13]]}))

        before = len(files_read)
        h = Harness(PretrainStage(ctx), spec=spec, stage_name="pretrain", run_id="r",
                    state_dir=Path(out) / f"mem{in_memory}", dist=d, on_step=hook)
        res = h.run()
        assert res["state"] == "finished" and h.step == STEPS, res
        results[in_memory] = {"files_read": len(files_read) - before,
                              "losses": [r["loss"] for r in h.exporter.history(0)],
                              "batches": [r["batch_index"] for r in h.exporter.history(0)]}
        torch.save(flat_state(h.stage.model, h.optimizer), Path(out) / f"state-{rank}-{in_memory}.pt")
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
    d.close()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    return spawn_gloo_ranks(_worker, WORLD, tmp_path_factory.mktemp("memrb"))


def test_every_rank_restores_from_memory_and_trains_as_from_the_files(two_ranks):
    for rank in range(WORLD):
        res = json.loads((two_ranks / f"rank{rank}.json").read_text())
        disk, mem = res["0"], res["2"]
        assert disk["files_read"] == 1 and mem["files_read"] == 0  # each rank: its own copy, no file read
        # steps 1-17, then from step 11 again on batch 13 (10-12 skipped), the same on both paths
        assert mem["batches"][16:19] == [16, 13, 14] and mem["batches"] == disk["batches"]
        assert mem["losses"] == disk["losses"]
        a = torch.load(two_ranks / f"state-{rank}-0.pt")
        b = torch.load(two_ranks / f"state-{rank}-2.pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the ranks stayed replicas of each other
    r0, r1 = torch.load(two_ranks / "state-0-2.pt"), torch.load(two_ranks / "state-1-2.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
