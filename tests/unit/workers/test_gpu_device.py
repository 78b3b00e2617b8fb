"""Device, backend, autocast and GPU reservation decisions, on a CPU-only host with fakes
(issue: GPU honesty, items 3, 4, 5 and 8). Nothing here starts Ray or touches a GPU."""
from __future__ import annotations

import contextlib
import inspect
import time

import pytest
import torch
from ray.exceptions import GetTimeoutError

from trainguard.workers import group as group_module
from trainguard.workers.group import GpusUnavailable, WorkerGroup, plan_gpus, reserve_gpus
from trainguard.workers.runtime import harness as harness_module
from trainguard.workers.runtime.distributed import Dist, cuda_ordinal, group_backend, rank_device
from trainguard.workers.runtime.harness import Harness, autocast_dtype_for, make_context, sync_device

from ._tiny import TinyStage, tiny_spec

torch.set_num_threads(1)


# -- item 3: CUDA only with a GPU from Ray; one backend per group ------------------------------
def test_a_rank_without_a_ray_gpu_trains_on_the_cpu_even_when_it_sees_gpus():
    # a warm-pool actor on a GPU node: no GPU reserved, CUDA_VISIBLE_DEVICES left as the node has it
    dev = rank_device(False, [], cuda_available=True, visible_devices="0,1,2,3")
    assert dev == torch.device("cpu")


def test_a_gpu_rank_uses_the_gpu_ray_assigned():
    assert rank_device(True, ["3"], cuda_available=True, visible_devices="3") == torch.device("cuda", 0)
    # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: the variable is the process's own
    assert rank_device(True, [2], cuda_available=True, visible_devices=None) == torch.device("cuda", 2)
    assert cuda_ordinal("5", "4,5,6") == 1
    with pytest.raises(RuntimeError, match="not among"):
        cuda_ordinal("7", "4,5,6")


def test_a_gpu_rank_without_a_usable_gpu_fails_instead_of_falling_back_to_the_cpu():
    with pytest.raises(RuntimeError, match="assigned this rank no GPU"):
        rank_device(True, [], cuda_available=True, visible_devices="0")
    with pytest.raises(RuntimeError, match="is_available"):
        rank_device(True, ["0"], cuda_available=False, visible_devices="0")


def test_the_group_decides_one_backend_and_a_rank_cannot_disagree():
    assert group_backend(True) == "nccl" and group_backend(False) == "gloo"
    with pytest.raises(ValueError, match="one kind of device"):
        Dist.init(rank=0, world_size=2, addr="127.0.0.1", port=1, device=torch.device("cpu"), backend="nccl")
    with pytest.raises(ValueError, match="one kind of device"):
        Dist.init(rank=0, world_size=2, addr="127.0.0.1", port=1, device=torch.device("cuda", 0), backend="gloo")
    single = Dist.init(rank=0, world_size=1, addr="127.0.0.1", port=1, device=torch.device("cpu"))
    assert not single.enabled


class FakeRemote:
    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def remote(self, *args, **kwargs):
        self.log.append((self.name, args, kwargs))
        return f"ref-{self.name}-{len(self.log)}"


class FakeActor:
    def __init__(self, options: dict | None = None) -> None:
        self.options = options or {}
        self.calls: list = []
        self.configure = FakeRemote(self.calls, "configure")
        self.rendezvous = FakeRemote(self.calls, "rendezvous")
        self.run = FakeRemote(self.calls, "run")


class FakeTrainWorker:
    created: list[FakeActor] = []

    @classmethod
    def options(cls, **opts):
        class _Creator:
            @staticmethod
            def remote():
                a = FakeActor(opts)
                cls.created.append(a)
                return a
        return _Creator


class FakePool:
    def take(self, n: int) -> list[FakeActor]:
        return [FakeActor() for _ in range(n)]

    def take_on_nodes(self, nodes: list, *, refill: bool = True) -> list:
        return [(FakeActor(), n) for n in nodes]  # a warm spare on every bundle's node


class FakeRay:
    def __init__(self, cluster: dict, available: dict | None = None, ready: bool = True) -> None:
        self.cluster, self.available, self.ready = cluster, available or cluster, ready

    def cluster_resources(self) -> dict:
        return dict(self.cluster)

    def available_resources(self) -> dict:
        return dict(self.available)

    def kill(self, actor, no_restart=True) -> None:
        pass

    def get(self, ref, timeout=None):
        if not self.ready:
            raise GetTimeoutError("placement group not ready")
        return ref


class FakePlacementGroup:
    def __init__(self, bundles, strategy) -> None:
        self.bundles, self.strategy = bundles, strategy

    def ready(self):
        return "pg-ready"


def _group(tmp_path, world_size: int) -> WorkerGroup:
    return WorkerGroup(run_id="r1", spec=tiny_spec(world_size=world_size), stage_name="pretrain", state_dir=tmp_path)


def _configured_use_gpu(actors: list[FakeActor]) -> list[bool]:
    return [kw["use_gpu"] for a in actors for name, _, kw in a.calls if name == "configure"]


def test_a_cpu_group_takes_warm_actors_and_tells_every_rank_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(group_module, "ray", FakeRay({"CPU": 8}))
    monkeypatch.setattr(group_module, "warm_pool", FakePool)
    # gang scheduling (issue 11): the CPU group's placement group comes first (tests/unit/workers/test_placement.py)
    monkeypatch.setattr(group_module, "placement_group", FakePlacementGroup)
    monkeypatch.setattr(group_module, "placement_group_table", lambda pg: {"bundles_to_node_id": {0: "n", 1: "n"}})
    g = _group(tmp_path, 2)
    g.start()
    assert _configured_use_gpu(g._actors) == [False, False]


def test_a_gpu_group_reserves_one_gpu_per_rank_and_tells_every_rank_gpu(tmp_path, monkeypatch):
    removed = []
    FakeTrainWorker.created = []
    monkeypatch.setattr(group_module, "ray", FakeRay({"GPU": 4}))
    monkeypatch.setattr(group_module, "TrainWorker", FakeTrainWorker)
    monkeypatch.setattr(group_module, "placement_group", FakePlacementGroup)
    monkeypatch.setattr(group_module, "remove_placement_group", removed.append)
    g = _group(tmp_path, 2)
    g.start()
    assert _configured_use_gpu(FakeTrainWorker.created) == [True, True]
    assert g._pg.bundles == [{"GPU": 1}, {"GPU": 1}]
    opts = [a.options for a in FakeTrainWorker.created]
    assert [o["num_gpus"] for o in opts] == [1, 1]
    assert [o["scheduling_strategy"].placement_group_bundle_index for o in opts] == [0, 1]
    g.shutdown()
    assert len(removed) == 1  # the GPUs go back when the group ends


# -- item 8: free GPUs, not the cluster's total ------------------------------------------------
def test_plan_uses_gpus_only_when_the_cluster_has_one_per_rank():
    assert plan_gpus(4, {"GPU": 8.0, "CPU": 64.0})
    assert not plan_gpus(4, {"GPU": 2.0})
    assert not plan_gpus(1, {"CPU": 4.0})


def test_gpus_held_by_other_runs_fail_the_start_with_what_is_missing(monkeypatch):
    removed = []
    monkeypatch.setattr(group_module, "ray", FakeRay({"GPU": 8}, {"GPU": 2}, ready=False))
    monkeypatch.setattr(group_module, "placement_group", FakePlacementGroup)
    monkeypatch.setattr(group_module, "remove_placement_group", removed.append)
    with pytest.raises(GpusUnavailable) as e:
        reserve_gpus(4, "run r1 stage pretrain", wait_s=0.1)
    msg = str(e.value)
    assert "run r1 stage pretrain" in msg and "needs 4 GPUs" in msg and "8 GPUs, 2 free" in msg
    assert len(removed) == 1  # no half-made reservation is left holding GPUs


# -- item 4: bf16 only where the GPU has it ------------------------------------------------------
def test_autocast_bf16_only_on_gpus_with_native_bf16():
    cuda = torch.device("cuda", 0)
    assert autocast_dtype_for(cuda, lambda d: True) is torch.bfloat16
    assert autocast_dtype_for(cuda, lambda d: False) is None  # V100/T4: fp32
    assert autocast_dtype_for(torch.device("cpu"), lambda d: True) is None


def test_torch_has_is_bf16_supported_including_emulation():
    assert "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters


class FakeEmulatingGpu:
    """A V100 as torch.cuda sees it: bf16 "supported" only by emulation."""

    def __init__(self) -> None:
        self.asked: list[dict] = []

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        self.asked.append({"including_emulation": including_emulation})
        return including_emulation

    def device(self, device):
        return contextlib.nullcontext()


def test_make_context_trains_an_emulating_gpu_in_fp32(monkeypatch):
    fake = FakeEmulatingGpu()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake.is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    ctx = make_context(tiny_spec(), "pretrain", run_id="r", device=torch.device("cuda", 0))
    assert ctx.autocast_dtype is None
    assert fake.asked == [{"including_emulation": False}]


def test_cpu_context_has_no_autocast():
    assert make_context(tiny_spec(), "pretrain", run_id="r", device=torch.device("cpu")).autocast_dtype is None


# -- item 5: the clock is read after the queued GPU work ----------------------------------------
def test_sync_device_synchronizes_cuda_only(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    sync_device(torch.device("cpu"))
    assert synced == []
    sync_device(torch.device("cuda", 0))
    assert synced == [torch.device("cuda", 0)]


def test_compute_seconds_is_read_after_the_device_sync(tmp_path, monkeypatch):
    """A fake sync that takes 30 ms stands in for a GPU still running the backward pass."""
    calls = []

    def fake_slow_sync(device: torch.device) -> None:
        calls.append(device)
        time.sleep(0.03)

    monkeypatch.setattr(harness_module, "sync_device", fake_slow_sync)
    spec = tiny_spec(steps=3)
    ctx = make_context(spec, "pretrain", run_id="run1", device=torch.device("cpu"))
    h = Harness(TinyStage(ctx), spec=spec, stage_name="pretrain", run_id="run1",
                state_dir=tmp_path)
    h.run()
    recs = h.exporter.history(0)
    assert len(calls) == 3 and all(r["compute_seconds"] >= 0.03 for r in recs)
