"""Issue 11, item 1: gang scheduling. A CPU worker group reserves a placement group with a
bundle per rank before any rank starts, takes warm spares that live on the bundles' nodes
and creates the other ranks inside their bundles; a group that cannot be placed in time
raises InsufficientResources naming what was asked and what is free. Fakes; no Ray."""
from __future__ import annotations

import pytest

from trainguard.service.domain.detectors import Finding
from trainguard.service.domain.policy import Action, RunSnapshot, decide
from trainguard.workers import group as group_module
from trainguard.workers.group import InsufficientResources, WorkerGroup, reserve
from trainguard.workers.spec import SpecError, parse_pipeline

from ._tiny import tiny_spec
from .test_gpu_device import FakeActor, FakePlacementGroup, FakeRay, FakeTrainWorker


def _spec_dict(placement: dict | None = None) -> dict:
    stage = {"name": "pretrain", "kind": "pretrain", "steps": 10, "world_size": 2}
    if placement is not None:
        stage["placement"] = placement
    return {"name": "p", "stages": [stage]}


def test_the_placement_option_parses_and_a_stage_without_it_dumps_as_before():
    plain = parse_pipeline(_spec_dict())
    assert "placement" not in plain.model_dump(mode="json")["stages"][0]
    assert plain.stages[0].placement.strategy == "PACK"
    assert plain.stages[0].placement.cpus(use_gpu=False) == 1.0 and plain.stages[0].placement.cpus(use_gpu=True) == 0.0
    spread = parse_pipeline(_spec_dict({"strategy": "SPREAD", "cpus_per_rank": 0.5}))
    assert spread.stages[0].placement.cpus(use_gpu=False) == 0.5
    again = parse_pipeline(spread.model_dump(mode="json"))
    assert again.stages[0].placement == spread.stages[0].placement
    with pytest.raises(SpecError, match="stages.0.pretrain.placement.strategy"):
        parse_pipeline(_spec_dict({"strategy": "ANYWHERE"}))
    with pytest.raises(SpecError, match="cpus_per_rank"):
        parse_pipeline(_spec_dict({"cpus_per_rank": -1}))


def test_insufficient_resources_needs_an_operator_and_spends_no_budget():
    d = decide(Finding("insufficient_resources", 12, 12, {}), RunSnapshot(budgets_used={"worker": 99}))
    assert d.action is Action.NEEDS_ATTENTION and "could not be placed" in d.reason and d.source is None


class FakePool:
    """Spares on known nodes: `take_on_nodes` hands out one per wanted node where it has one."""

    def __init__(self, spares: dict[str, int]) -> None:
        self.spares = dict(spares)
        self.asked: list[list[str | None]] = []
        self.refills = 0

    def __call__(self) -> "FakePool":
        return self

    def refill(self) -> None:
        self.refills += 1

    def take_on_nodes(self, nodes, *, refill=True):
        self.asked.append(list(nodes))
        out = []
        for n in nodes:
            if self.spares.get(n, 0) > 0:
                self.spares[n] -= 1
                out.append((FakeActor({"spare_on": n}), n))
            else:
                out.append((None, n))
        return out


def _cpu_group(tmp_path, monkeypatch, pool: FakePool, nodes: dict[int, str], placement: dict | None = None):
    FakeTrainWorker.created = []
    removed: list = []
    monkeypatch.setattr(group_module, "ray", FakeRay({"CPU": 8}))
    monkeypatch.setattr(group_module, "TrainWorker", FakeTrainWorker)
    monkeypatch.setattr(group_module, "placement_group", FakePlacementGroup)
    monkeypatch.setattr(group_module, "remove_placement_group", removed.append)
    monkeypatch.setattr(group_module, "placement_group_table", lambda pg: {"bundles_to_node_id": nodes})
    monkeypatch.setattr(group_module, "warm_pool", pool)
    extra = {"placement": placement} if placement else {}
    g = WorkerGroup(run_id="r1", spec=tiny_spec(world_size=2, **extra), stage_name="pretrain", state_dir=tmp_path)
    g.start()
    return g, removed


def test_a_cpu_group_reserves_a_bundle_per_rank_and_takes_the_spares_on_the_bundles_nodes(tmp_path, monkeypatch):
    pool = FakePool({"n1": 1, "n2": 0})
    g, removed = _cpu_group(tmp_path, monkeypatch, pool, {0: "n1", 1: "n2"}, {"strategy": "SPREAD"})
    assert g._pg.bundles == [{"CPU": 1.0}, {"CPU": 1.0}] and g._pg.strategy == "SPREAD"
    assert pool.asked == [["n1", "n2"]]
    # rank 0: the warm spare already on n1 (0 CPUs: the bundle holds them); rank 1: a new actor in bundle 1
    assert g._actors[0].options == {"spare_on": "n1"}
    (fresh,) = FakeTrainWorker.created
    assert g._actors[1] is fresh and fresh.options["num_cpus"] == 1.0
    assert fresh.options["scheduling_strategy"].placement_group_bundle_index == 1
    assert g._spare_nodes == {0: "n1", 1: "n2"}
    assert [kw["use_gpu"] for a in g._actors for name, _, kw in a.calls if name == "configure"] == [False, False]
    pg = g._pg
    assert pool.refills == 0  # not while the group starts: once it is up, or (here) when it ends first
    g.shutdown()
    assert pool.refills == 1
    assert removed == [pg]  # the CPUs go back when the group ends


def test_zero_cpus_per_rank_turns_gang_scheduling_off(tmp_path, monkeypatch):
    class Pool:
        def __call__(self):
            return self

        def take_with_nodes(self, n, *, refill=True):
            return [(FakeActor(), None) for _ in range(n)]

    FakeTrainWorker.created = []
    monkeypatch.setattr(group_module, "ray", FakeRay({"CPU": 8}))
    monkeypatch.setattr(group_module, "placement_group", lambda *a, **k: pytest.fail("no placement group"))
    monkeypatch.setattr(group_module, "warm_pool", Pool())
    g = WorkerGroup(run_id="r1", spec=tiny_spec(world_size=2, placement={"cpus_per_rank": 0}),
                    stage_name="pretrain", state_dir=tmp_path)
    g.start()
    assert g._pg is None and len(g._actors) == 2


def test_a_group_that_cannot_be_placed_raises_with_what_was_asked_and_what_is_free(monkeypatch):
    removed: list = []
    cluster = {"CPU": 4.0, "memory": 1e9, "node:127.0.0.1": 1.0}
    free = {"CPU": 1.0, "CPU_group_abc": 2.0, "object_store_memory": 1e8}
    monkeypatch.setattr(group_module, "ray", FakeRay(cluster, free, ready=False))
    monkeypatch.setattr(group_module, "placement_group", FakePlacementGroup)
    monkeypatch.setattr(group_module, "remove_placement_group", removed.append)
    with pytest.raises(InsufficientResources) as e:
        reserve([{"CPU": 1.0}] * 3, "SPREAD", "run r1 stage pretrain", wait_s=0.1)
    ev = e.value.evidence
    assert ev["asked"] == {"bundles": 3, "per_bundle": {"CPU": 1.0}, "strategy": "SPREAD", "total": {"CPU": 3.0}}
    assert ev["free"] == {"CPU": 1.0} and ev["cluster"] == {"CPU": 4.0} and ev["waited_s"] == 0.1
    msg = str(e.value)
    assert "run r1 stage pretrain" in msg and "3 x {'CPU': 1.0}" in msg and "free now: {'CPU': 1.0}" in msg
    assert len(removed) == 1  # no half-made reservation is left holding CPUs


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_a_rank_unreachable_on_a_node_whose_raylet_is_gone_died_with_its_node(tmp_path, monkeypatch):
    """A peer's collective fails at once when a node goes; Ray's health checks mark the node
    dead only ~15 s later. A rank whose status cannot be fetched and whose raylet accepts no
    connection is lost with its node (node_lost), not a worker loss of the rank that saw the error."""
    import socket

    live = socket.socket()
    live.bind(("127.0.0.1", 0))
    live.listen()

    class Nodes(FakeRay):
        def nodes(self):
            return [{"NodeID": "n0", "Alive": True, "NodeManagerAddress": "127.0.0.1",
                     "NodeManagerPort": live.getsockname()[1]},
                    {"NodeID": "n1", "Alive": True, "NodeManagerAddress": "127.0.0.1", "NodeManagerPort": _closed_port()}]

    monkeypatch.setattr(group_module, "ray", Nodes({"CPU": 8}))
    g = WorkerGroup(run_id="r1", spec=tiny_spec(world_size=2), stage_name="pretrain", state_dir=tmp_path)
    g._endpoint_refs, g._endpoints = ["e0", "e1"], [{"node": "n0"}, {"node": "n1"}]
    ranks = [{"rank": 0, "state": "failed", "alive": True, "error": "rank 0: gloo: connection reset"},
             {"rank": 1, "state": "running", "alive": True, "error": "rank 1: status timed out", "unreachable": True}]
    try:
        g._add_nodes(ranks)
    finally:
        live.close()
    assert ranks[0]["alive"] and ranks[0]["node_alive"] is None
    assert not ranks[1]["alive"] and ranks[1]["state"] == "failed" and ranks[1]["node_alive"] is False
    assert "n1 is gone" in ranks[1]["error"] and "unreachable" not in ranks[1]
