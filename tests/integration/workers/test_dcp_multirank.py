"""DCP checkpoints on 2 gloo ranks (torch.multiprocessing on localhost, no Ray): a synchronous
save on the default group, an async save on a dedicated group while the ranks keep training
(all-reducing gradients on the default group), a 2-rank verified load and a 2-rank refusal,
and the 2-rank checkpoints loaded at world size 1 (resharding, a DTensor sharded over the
ranks included). One spawn serves every test (module fixture) to stay well under 30 s."""
from __future__ import annotations

import json
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from trainguard.workers.contract import CheckpointRef
from trainguard.workers.runtime.checkpoint import CheckpointCorrupt
from trainguard.workers.runtime.dcp_store import TrainState, load_sharded, save_sharded

from tests.support import flat_state, spawn_gloo_ranks

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]

WORLD = 2


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _train(model, opt, rank: int, step: int, n: int) -> int:
    """Data-parallel steps: per-rank batches, gradients averaged on the default group."""
    import torch.distributed as dist

    for s in range(step, step + n):
        g = torch.Generator().manual_seed(1000 * s + rank)
        model(torch.randn(5, 8, generator=g)).pow(2).mean().backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        opt.step()
        opt.zero_grad()
    return step + n


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    d = Path(out)
    mesh = init_device_mesh("cpu", (WORLD,))
    full = torch.arange(32, dtype=torch.float32).reshape(8, 4)
    sharded = distribute_tensor(full, mesh, [Shard(0)])  # rank r holds rows 4r..4r+3 only
    model, opt = _model()
    step = _train(model, opt, rank, 0, 3)

    # 1. synchronous save on the default group
    res = save_sharded({"train": TrainState(model, opt), "sharded": {"w": sharded}}, d / "ckpt" / "step-3",
                       fields={"step": step, "healthy": True})
    refs = [None] * WORLD
    dist.all_gather_object(refs, res.ref.to_dict())
    if rank == 0:
        assert refs[0] == refs[1], "every rank gets the same reference"
        assert {n for n in res.ref.files if n.endswith(".distcp")} == {"__0_0.distcp", "__1_0.distcp"}
        torch.save(flat_state(model, opt), d / "expected-3.pt")
        (d / "ref-3.json").write_text(json.dumps(res.ref.to_dict()))

    # 2. async save on a dedicated group while training goes on (on the default group)
    group = dist.new_group(backend="gloo")
    expected5 = flat_state(model, opt)
    pending = save_sharded({"train": TrainState(model, opt)}, d / "ckpt" / "step-5", process_group=group,
                           async_=True, fields={"step": step})
    step = _train(model, opt, rank, step, 4)
    res5 = pending.result(timeout=60)
    dist.all_gather_object(refs, res5.ref.to_dict())
    if rank == 0:
        assert refs[0] == refs[1]
        torch.save(expected5, d / "expected-5.pt")
        (d / "ref-5.json").write_text(json.dumps({**res5.ref.to_dict(), "stall_s": pending.stall_s}))

    # 3. a verified 2-rank load (async checkpoint, on the dedicated group), bitwise
    m2, o2 = _model()
    load_sharded(res5.ref, {"train": TrainState(m2, o2)}, process_group=group)
    assert _bitwise(expected5, flat_state(m2, o2)), f"rank {rank}: 2-rank load differs"

    # 4. a flipped byte in rank 1's shard: refused on both ranks, nothing loaded
    res7 = save_sharded({"train": TrainState(model, opt)}, d / "ckpt" / "step-7", process_group=group)
    dist.barrier()
    if rank == 0:
        shard = Path(res7.path) / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))
    dist.barrier()
    m3, o3 = _model()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    get_state_dict(m3, o3)  # initialises the optimizer state (zeros), as a load's template does: before the load
    before = flat_state(m3, o3)
    try:
        load_sharded(res7.ref, {"train": TrainState(m3, o3)}, process_group=group)
        verdict = "loaded"
    except CheckpointCorrupt as e:
        verdict = f"CheckpointCorrupt: {e}"
    assert _bitwise(before, flat_state(m3, o3)), f"rank {rank}: state changed by a refused load"
    (d / f"verdict-{rank}.txt").write_text(verdict)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    return spawn_gloo_ranks(_worker, WORLD, tmp_path_factory.mktemp("dcp2"))


def _ref(d: Path, step: int) -> CheckpointRef:
    return CheckpointRef.from_dict(json.loads((d / f"ref-{step}.json").read_text()))


@pytest.mark.timeout(120)
def test_two_rank_save_loads_at_world_size_one_bitwise(two_ranks):
    model, opt = _model()
    w = torch.zeros(8, 4)
    manifest = load_sharded(_ref(two_ranks, 3), {"train": TrainState(model, opt), "sharded": {"w": w}})
    assert manifest["world_size"] == 2 and manifest["step"] == 3
    assert _bitwise(torch.load(two_ranks / "expected-3.pt"), flat_state(model, opt))
    assert torch.equal(w, torch.arange(32, dtype=torch.float32).reshape(8, 4))  # both ranks' rows


@pytest.mark.timeout(120)
def test_async_save_on_a_dedicated_group_holds_the_state_at_the_call(two_ranks):
    info = json.loads((two_ranks / "ref-5.json").read_text())
    assert info["stall_s"] >= 0
    model, opt = _model()
    load_sharded(_ref(two_ranks, 5), {"train": TrainState(model, opt)})
    assert _bitwise(torch.load(two_ranks / "expected-5.pt"), flat_state(model, opt))


@pytest.mark.timeout(120)
def test_a_flipped_byte_in_one_ranks_shard_is_refused_on_every_rank(two_ranks):
    for rank in range(WORLD):
        verdict = (two_ranks / f"verdict-{rank}.txt").read_text()
        assert verdict.startswith("CheckpointCorrupt") and "__1_0.distcp" in verdict, verdict
