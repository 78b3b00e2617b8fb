"""Ray actors for one stage of a run: `TrainWorker` per rank, `WorkerGroup` as the handle.

The supervisor (service/adapters/ray.py) drives a stage through `WorkerGroup`: start it,
read the workers' metrics endpoints, send control messages, poll for completion or
failure, shut it down, and start a new group from a checkpoint to recover.

Each actor runs the step loop in one of its threads (`max_concurrency`), so control and
status calls are served while training runs, and even while a rank hangs.

Gang scheduling: every group reserves its resources in one Ray placement group first — a
bundle per rank (the stage's `placement`: strategy PACK/SPREAD/..., `cpus_per_rank`), all or
nothing — waiting up to $TRAINGUARD_PLACEMENT_WAIT_S (default 120 s); a group that cannot be
placed in time raises `InsufficientResources` naming what was asked and what is free (the
supervisor records an `insufficient_resources` incident), never a half-started group.

Elastic stages (`min_world_size`): a group that cannot have its full size within
$TRAINGUARD_ELASTIC_WAIT_S starts at the largest size the nodes' free resources hold, not below
the minimum (`reserve_elastic`); `WorkerGroup.world_size` is then the smaller size its ranks
train with (`elastic` says how it was chosen), the global batch unchanged.

GPUs: a group runs either all its ranks on GPUs or all on CPUs (`plan_gpus`), never a mix:
a GPU group's bundles hold one GPU per rank (`reserve_gpus`: waits up to
$TRAINGUARD_GPU_WAIT_S when set, else the placement wait), and each rank uses the GPU Ray
assigned it; its ranks are new actors inside the bundles. A CPU group's ranks are warm spares
(`WarmPool`) that already live on the node Ray chose for their bundle — 0-CPU actors: the
bundle holds their CPUs — or, where no spare is on that node, new actors inside the bundle.
Warm-pool actors have no GPU; they hide the GPUs they can see.
"""
from __future__ import annotations

import contextvars
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.placement_group import placement_group_table
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from trainguard.workers.contract import CheckpointRef, CheckpointReport, Control, ControlKind, StageKind
from trainguard.workers.spec import HF_OFFLINE_ENV, PipelineSpec
from trainguard.workers.usercode import UserCode, load_entrypoint

log = logging.getLogger(__name__)

__all__ = ["TrainWorker", "WorkerGroup", "WarmPool", "warm_pool", "group_state", "STATE_DIR_ENV", "plan_gpus",
           "reserve_gpus", "GpusUnavailable", "GPU_WAIT_ENV", "worker_env", "FORWARDED_ENV_PREFIXES",
           "InsufficientResources", "PLACEMENT_WAIT_ENV", "reserve", "placement_wait_s", "bundle_nodes", "node_id",
           "dead_nodes", "ELASTIC_WAIT_ENV", "elastic_wait_s", "bundles_that_fit", "elastic_sizes",
           "accumulation_micro_batch", "free_per_node", "reserve_elastic", "DETACHED_NAMESPACE", "use_detached_groups",
           "detached_groups", "attach_group", "reap_detached"]

STATE_DIR_ENV = "TRAINGUARD_STATE_DIR"
GPU_WAIT_ENV = "TRAINGUARD_GPU_WAIT_S"
PLACEMENT_WAIT_ENV = "TRAINGUARD_PLACEMENT_WAIT_S"
DEFAULT_PLACEMENT_WAIT_S = 120.0
TERMINAL = ("finished", "stopped", "failed")


class InsufficientResources(RuntimeError):
    """A worker group could not be placed in time: its placement group (a bundle per rank) was
    not ready within the wait. `evidence`: what was asked (bundles, strategy, totals), what is
    free and what the cluster has (`ray.available_resources()` / `cluster_resources()`), the wait."""

    def __init__(self, message: str, evidence: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.evidence: dict[str, Any] = dict(evidence or {})


class GpusUnavailable(InsufficientResources):
    """A GPU worker group could not get its GPUs in time."""


def placement_wait_s(use_gpu: bool = False) -> float:
    """How long a group waits for its placement group: $TRAINGUARD_PLACEMENT_WAIT_S (default
    120 s); a GPU group honours $TRAINGUARD_GPU_WAIT_S first (its older name)."""
    raw = (os.environ.get(GPU_WAIT_ENV) if use_gpu else None) or os.environ.get(PLACEMENT_WAIT_ENV)
    return float(raw) if raw else DEFAULT_PLACEMENT_WAIT_S


def _plain_resources(res: dict[str, Any]) -> dict[str, float]:
    """CPU, GPU and custom resources; not Ray's per-node, per-placement-group or memory entries."""
    return {k: round(float(v), 3) for k, v in sorted(res.items())
            if not k.startswith("node:") and "_group_" not in k and k not in ("memory", "object_store_memory")}


def placement_evidence(what: str, bundles: list[dict[str, float]], strategy: str, waited_s: float) -> dict[str, Any]:
    asked: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            asked[k] = asked.get(k, 0.0) + float(v)
    return {"group": what, "asked": {"bundles": len(bundles), "per_bundle": bundles[0] if bundles else {},
                                     "strategy": strategy, "total": asked},
            "free": _plain_resources(ray.available_resources()), "cluster": _plain_resources(ray.cluster_resources()),
            "waited_s": waited_s}


def missing_resources_message(ev: dict[str, Any]) -> str:
    a = ev["asked"]
    return (f"{ev['group']}: needs {a['bundles']} x {a['per_bundle']} ({a['strategy']}, {a['total']} in all) and "
            f"could not place them in {ev['waited_s']:g} s; free now: {ev['free']}, the cluster: {ev['cluster']}. "
            f"Free capacity (stop another run, add nodes), lower the stage's placement.cpus_per_rank, or raise "
            f"${PLACEMENT_WAIT_ENV}.")


# ---- detached worker groups (a supervisor restart touches nothing) -------------------------------
DETACHED_NAMESPACE = "trainguard"
"""The Ray namespace of detached rank actors and placement groups (the supervisor joins it)."""
_detached = False
_pg_name: contextvars.ContextVar[str | None] = contextvars.ContextVar("trainguard_pg_name", default=None)


def use_detached_groups(on: bool) -> None:
    """Detached mode (the supervisor on an external cluster): every rank actor, warm spare and
    placement group this process makes from now on is detached and named in DETACHED_NAMESPACE
    (ranks `<run>/<stage>/<generation>/<rank>`, spares `spare/<id>`, placement groups
    `<run>/<stage>/<generation>`), so it outlives the supervisor's process; a restarted
    supervisor re-attaches (`attach_group`: ranks found by what they say they are, so a spare a
    group took is found too) and reaps those of runs no longer active (`reap_detached`)."""
    global _detached
    _detached = on


def detached_groups() -> bool:
    return _detached


def _group_prefix(run_id: str, stage: str) -> str:
    return f"{run_id}/{stage}/"


def _detached_options(name: str) -> dict[str, Any]:
    return {"name": name, "namespace": DETACHED_NAMESPACE, "lifetime": "detached"} if _detached else {}


def _named_actors() -> list[str]:
    try:
        return [str(a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)
                if a.get("namespace") == DETACHED_NAMESPACE]
    except Exception:  # noqa: BLE001 - no listing: nothing to find
        return []


def _named_pgs() -> dict[str, str]:
    """name -> id of the live placement groups with a name (ours: `<run>/<stage>/<generation>`)."""
    out: dict[str, str] = {}
    for pg_id, info in placement_group_table().items():
        name = str(info.get("name") or "")
        if name and info.get("state") != "REMOVED":
            out[name] = str(pg_id)
    return out


def _remove_pg_id(pg_id: str) -> None:
    try:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    except Exception:  # noqa: BLE001 - already removed
        pass


def _detached_actors(timeout: float = 10.0) -> list[tuple[str, Any, dict[str, Any] | None]]:
    """(name, handle, its TrainWorker.identity() or None when it did not answer in `timeout`)
    of every named actor in DETACHED_NAMESPACE: group ranks and warm spares (`spare/<id>`; a
    spare a group took keeps its name, its identity says whose rank it is)."""
    handles: list[tuple[str, Any]] = []
    for name in _named_actors():
        try:
            handles.append((name, ray.get_actor(name, namespace=DETACHED_NAMESPACE)))
        except Exception:  # noqa: BLE001 - gone meanwhile
            continue
    refs = [h.identity.remote() for _, h in handles]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout) if refs else ([], [])
    done = set(ready)
    out: list[tuple[str, Any, dict[str, Any] | None]] = []
    for (name, h), ref in zip(handles, refs):
        ident = None
        if ref in done:
            try:
                ident = ray.get(ref)
            except Exception:  # noqa: BLE001 - died
                ident = None
        out.append((name, h, ident))
    return out


def reap_detached(keep: Iterable[str]) -> list[str]:
    """Kill the detached rank actors, and remove the placement groups, of every run not in
    `keep` (stopped, finished or failed while no supervisor watched, or unknown), and the idle
    warm spares a previous supervisor left (this one makes its own); returns the actor names
    reaped. Called by a supervisor when it starts, before it re-attaches."""
    kept = set(keep)
    reaped: list[str] = []
    for name, handle, ident in _detached_actors():
        run = (ident or {}).get("run_id") or (None if name.startswith("spare/") else name.split("/", 1)[0])
        if run in kept:
            continue
        try:
            ray.kill(handle, no_restart=True)
            reaped.append(name)
        except Exception:  # noqa: BLE001 - gone meanwhile
            pass
    for name, pg_id in _named_pgs().items():
        if name.count("/") == 2 and name.split("/", 1)[0] not in kept:
            _remove_pg_id(pg_id)
    return reaped


def reserve(bundles: list[dict[str, float]], strategy: str, what: str, wait_s: float | None = None,
            error: type[InsufficientResources] = InsufficientResources,
            message: Any = None) -> Any:
    """A placement group with `bundles`, ready (all of them placed at once); or `error` (an
    InsufficientResources), the half-made reservation removed."""
    wait_s = placement_wait_s() if wait_s is None else wait_s
    name = _pg_name.get()
    pg = (placement_group(bundles, strategy=strategy, name=name, lifetime="detached") if _detached and name
          else placement_group(bundles, strategy=strategy))
    try:
        ray.get(pg.ready(), timeout=wait_s)
    except GetTimeoutError:
        remove_placement_group(pg)
        ev = placement_evidence(what, bundles, strategy, wait_s)
        raise error(message(ev) if message else missing_resources_message(ev), ev) from None
    return pg


def bundle_nodes(pg: Any, n: int) -> list[str | None]:
    """The node each of a ready placement group's `n` bundles was placed on (None: unknown)."""
    try:
        table = placement_group_table(pg).get("bundles_to_node_id") or {}
    except Exception:  # noqa: BLE001 - the GCS unreachable: no node known
        table = {}
    return [str(table[i]) if table.get(i) else None for i in range(n)]


# ---- elastic restart (a stage's `min_world_size`) ------------------------------------------------
ELASTIC_WAIT_ENV = "TRAINGUARD_ELASTIC_WAIT_S"
DEFAULT_ELASTIC_WAIT_S = 10.0
_EPS = 1e-6  # Ray keeps resources in units of 1/10000


def elastic_wait_s() -> float:
    """How long an elastic stage's group waits for its full size before it takes a smaller one:
    $TRAINGUARD_ELASTIC_WAIT_S (default 10 s; never longer than the placement wait). Also how
    long each smaller size that should fit is given."""
    raw = os.environ.get(ELASTIC_WAIT_ENV)
    return float(raw) if raw else DEFAULT_ELASTIC_WAIT_S


def bundles_that_fit(bundle: dict[str, float], strategy: str, free_per_node: Iterable[dict[str, float]],
                     limit: int) -> int:
    """How many copies of `bundle` (at most `limit`) one placement group could hold now on nodes
    with `free_per_node` free resources, under Ray's `strategy`: PACK and SPREAD use any node for
    any number of bundles, STRICT_PACK one node, STRICT_SPREAD one bundle per node."""
    per_node: list[int] = []
    for free in free_per_node:
        counts = [int(float(free.get(k, 0.0)) / float(v) + _EPS) for k, v in bundle.items() if float(v) > 0]
        per_node.append(min(counts) if counts else limit)
    if not per_node:
        return 0
    if strategy == "STRICT_PACK":
        n = max(per_node)
    elif strategy == "STRICT_SPREAD":
        n = sum(1 for c in per_node if c >= 1)
    else:  # PACK, SPREAD
        n = sum(per_node)
    return max(0, min(limit, n))


def elastic_sizes(world_size: int, min_world_size: int, fit: int | None) -> list[int]:
    """The smaller sizes to try, largest first, once the full `world_size` could not be placed:
    from the largest that `fit`s now (`bundles_that_fit`; None: unknown, every size) down to
    `min_world_size`. The last one is always `min_world_size`: when nothing larger can be had,
    the group waits for that (the placement wait), as a fixed-size group waits for its size."""
    top = world_size - 1 if fit is None else min(fit, world_size - 1)
    return list(range(top, min_world_size - 1, -1)) if top >= min_world_size else [min_world_size]


def accumulation_micro_batch(kind: str, batch_size: int, micro_batch_size: int | None, world_size: int,
                             placed: int) -> int | None:
    """The `micro_batch_size` a group shrunk from `world_size` to `placed` ranks trains with: each
    rank's share of the (unchanged) global batch grows, and gradient accumulation keeps each
    micro-step at the full-size share (memory per rank as planned). None: nothing to change — a
    group at full size, a stage that sets its own micro_batch_size, or a kind without accumulation
    (only pretrain and anneal have it: other kinds take the larger share in one step)."""
    if placed >= world_size or micro_batch_size is not None or kind not in ("pretrain", "anneal"):
        return None
    full_share = max(1, -(-batch_size // world_size))
    return full_share if full_share < -(-batch_size // placed) else None


def free_per_node() -> dict[str, dict[str, float]] | None:
    """Each alive node's free resources (the GCS's view, Ray's developer API); None where Ray does
    not say (a Ray Client connection, an older or newer Ray): every smaller size is then tried."""
    try:
        from ray._private import state as ray_state

        free = ray_state.available_resources_per_node()
        alive = {str(n["NodeID"]) for n in ray.nodes() if n.get("Alive", True)}
        return {str(node): _plain_resources(dict(res)) for node, res in free.items() if str(node) in alive}
    except Exception:  # noqa: BLE001 - not known: the caller tries the sizes one by one
        return None


def reserve_elastic(bundle: dict[str, float], strategy: str, what: str, world_size: int, min_world_size: int,
                    *, wait_s: float | None = None, probe_s: float | None = None,
                    error: type[InsufficientResources] = InsufficientResources,
                    message: Any = None) -> tuple[Any, int, dict[str, Any] | None]:
    """(placement group, ranks it holds, how it was chosen) for an elastic group: the full
    `world_size` when it is placed within `probe_s` ($TRAINGUARD_ELASTIC_WAIT_S, capped by the
    placement wait); else the largest size the nodes' free resources hold now, never below
    `min_world_size` (each tried for `probe_s`; the smallest waits the placement wait). The note
    (None at full size) says what was asked and what was free. `error` when not even
    `min_world_size` ranks could be placed."""
    wait_s = placement_wait_s() if wait_s is None else wait_s
    probe_s = min(wait_s, elastic_wait_s()) if probe_s is None else probe_s
    try:
        pg = reserve([dict(bundle) for _ in range(world_size)], strategy, what, probe_s, error, message)
        return pg, world_size, None
    except InsufficientResources as e:
        full = e.evidence
    free = free_per_node()
    fit = bundles_that_fit(bundle, strategy, free.values(), world_size) if free is not None else None
    sizes = elastic_sizes(world_size, min_world_size, fit)
    last: InsufficientResources | None = None
    for i, n in enumerate(sizes):
        try:
            pg = reserve([dict(bundle) for _ in range(n)], strategy, what,
                         wait_s if i == len(sizes) - 1 else probe_s, error, message)
        except InsufficientResources as e:
            last = e
            continue
        note = {"world_size": world_size, "placed": n, "min_world_size": min_world_size,
                "per_bundle": dict(bundle), "strategy": strategy, "full_size_waited_s": probe_s,
                "largest_fit": fit, "free_per_node": free, "cluster": full.get("cluster"),
                "tried": sizes[: i + 1]}
        return pg, n, note
    assert last is not None
    ev = {**last.evidence, "min_world_size": min_world_size, "world_size": world_size, "largest_fit": fit,
          "free_per_node": free, "tried": sizes}
    raise error(f"{last} (elastic: world_size {world_size} did not fit in {probe_s:g} s, nor any size down to "
                f"min_world_size {min_world_size})", ev) from None


def plan_gpus(world_size: int, cluster: dict[str, float]) -> bool:
    """Whether a group of `world_size` ranks runs on GPUs (one per rank): when the cluster
    has that many GPUs in total (`ray.cluster_resources()`). Whether they are free now is
    the placement group's business (`reserve_gpus`), not a reason to fall back to the CPU."""
    return world_size > 0 and cluster.get("GPU", 0) >= world_size


def missing_gpus_message(what: str, world_size: int, cluster: dict[str, float], available: dict[str, float],
                         waited_s: float) -> str:
    total, free = cluster.get("GPU", 0), available.get("GPU", 0)
    return (f"{what}: needs {world_size} GPUs (1 per rank) and could not reserve them in {waited_s:g} s; "
            f"the cluster has {total:g} GPUs, {free:g} free now — the rest are held by other runs "
            f"(or nodes being added did not come up in time). Wait, stop another run, or raise ${GPU_WAIT_ENV}.")


def reserve_gpus(world_size: int, what: str, wait_s: float | None = None, *, strategy: str = "PACK",
                 cpus_per_rank: float = 0.0) -> Any:
    """A placement group with one GPU bundle per rank (and `cpus_per_rank` CPUs), ready; or GpusUnavailable."""
    wait_s = placement_wait_s(use_gpu=True) if wait_s is None else wait_s
    bundle: dict[str, float] = {"GPU": 1, **({"CPU": cpus_per_rank} if cpus_per_rank > 0 else {})}

    def message(ev: dict[str, Any]) -> str:
        return missing_gpus_message(what, world_size, ev["cluster"], ev["free"], wait_s)

    return reserve([dict(bundle) for _ in range(world_size)], strategy, what, wait_s, GpusUnavailable, message)


# Checkpoint storage settings the operator gives the supervisor's process (never a pipeline):
# the S3 endpoint and credentials (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE, ...) and
# fsspec's per-protocol options (FSSPEC_S3_ENDPOINT_URL, ...). On a local Ray the workers inherit
# them anyway; on a cluster they reach the rank actors only through the actor's runtime_env.
FORWARDED_ENV_PREFIXES = ("AWS_", "FSSPEC_")


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables every TrainWorker process gets: the Hugging Face Hub offline, and
    the storage variables of `environ` (default: this process's) named by FORWARDED_ENV_PREFIXES."""
    environ = dict(os.environ) if environ is None else environ
    fwd = {k: v for k, v in environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    return {**fwd, **HF_OFFLINE_ENV}


# Every TrainWorker process (warm-pool spares included: the variables are fixed when the actor's
# process starts, so setting them later in the driver would not reach it) runs with the Hugging
# Face Hub offline: a pipeline's HF model is read from its local folder, never downloaded. The
# storage variables are read when this module is imported (the supervisor's environment at
# start-up): one set later in the process reaches no actor.
@ray.remote(num_cpus=0, max_concurrency=8, runtime_env={"env_vars": worker_env()})
class TrainWorker:
    """One rank. Created bare (imports only, so it can wait warm in the pool), then
    `configure`d for a stage — which starts the exporter, so endpoints exist before training."""

    def __init__(self) -> None:
        if not ray.get_gpu_ids():
            # no GPU reserved for this actor, yet Ray (2.60) leaves CUDA_VISIBLE_DEVICES as the node
            # has it: hide them all before anything initialises CUDA, so this process can never
            # touch (or make a CUDA context on) a GPU another run holds
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        from trainguard.workers.runtime.control import ControlInbox

        self.args: dict[str, Any] = {}
        self.rank = -1
        self.exporter = None
        self.inbox = ControlInbox()
        self.harness = None
        self.device: Any = None
        self.state = "starting"
        self.error: str | None = None
        self._lock = threading.Lock()
        self._ended = threading.Event()  # run() returned or raised (`outcome` waits on it)
        self._result: dict[str, Any] | None = None
        self._store: Any = None  # rank 0: the process group's store (`rendezvous`)

    def warm(self) -> str:
        """Pay the one-time costs every stage has; called on pool spares: the imports, the default
        corpora and the first optimizer step (constructing AdamW imports torch._dynamo: seconds),
        ~2 s of CPU. In a thread of its own at the lowest CPU priority (`_at_lowest_priority`):
        the pool replaces the spares a group takes at once, and a replacement warming up at
        normal priority took the CPU from that group while it started (on this project's 2-core
        machine a restarted group's checkpoint load took ~0.9 s instead of 15 ms)."""
        _at_lowest_priority(_warm_up)
        return node_id()

    def configure(self, *, run_id: str, spec: dict[str, Any], stage_name: str, rank: int, world_size: int,
                  state_dir: str, resume_from: dict[str, Any] | None, skip: list[list[int]],
                  lr_multiplier: float | None, inputs: dict[str, dict[str, Any]], fired_dir: str, bind_host: str | None,
                  checkpoint_root: str | None, use_gpu: bool = False,
                  user_code: dict[str, Any] | None = None, generation: int = 0) -> dict[str, Any]:
        """`use_gpu`: the group's decision for every rank (see `plan_gpus`). `user_code`: the
        deployment's allow-list for custom and loop stages (workers/usercode.py UserCode)."""
        import torch

        torch.set_num_threads(1)  # the CPUs are shared; one intra-op thread per rank

        from trainguard.workers.runtime.distributed import rank_device
        from trainguard.workers.runtime.exporter import Exporter
        from trainguard.workers.runtime.gpu import make_gpu_health

        self.args = dict(run_id=run_id, spec=spec, stage_name=stage_name, rank=rank, world_size=world_size,
                         state_dir=state_dir, resume_from=resume_from, skip=skip, lr_multiplier=lr_multiplier,
                         inputs=inputs, fired_dir=fired_dir, checkpoint_root=checkpoint_root, use_gpu=use_gpu,
                         user_code=user_code, generation=generation)
        self.rank = rank
        gpu_ids = ray.get_gpu_ids()
        self.device = rank_device(use_gpu, gpu_ids, cuda_available=bool(gpu_ids) and torch.cuda.is_available(),
                                  visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
        self.gpu = make_gpu_health(self.device)
        self.exporter = Exporter(run_id, stage_name, rank, gpu=self.gpu)
        self.port = self.exporter.start(bind_host)
        return self.endpoint()

    def endpoint(self) -> dict[str, Any]:
        host = self.exporter.host
        if host in ("0.0.0.0", "::", ""):
            host = ray.util.get_node_ip_address()
        return {"rank": self.rank, "host": host, "port": self.port, "node": node_id()}

    def rendezvous(self, world_size: int) -> tuple[str, int]:
        """Rank 0: the address of the process group's store, already listening (this node, a
        free port), so every rank's `run()` connects at once (`Dist.init`)."""
        from trainguard.workers.runtime.distributed import free_port, serve_store

        if world_size == 1:
            return "127.0.0.1", free_port()
        host = ray.util.get_node_ip_address()
        self._store = serve_store(host, world_size)
        return host, int(self._store.port)

    def run(self, addr: tuple[str, int], configured: dict[str, Any]) -> dict[str, Any]:
        """`configured` is `configure`'s result: passing its ObjectRef orders run() after it
        (a threaded actor may otherwise run the two calls concurrently)."""
        import torch

        from trainguard.workers.runtime.distributed import Dist, connect_store, group_backend
        from trainguard.workers.runtime.harness import Harness, make_context
        from trainguard.workers.spec import parse_pipeline
        from trainguard.workers.stages import STAGES

        a = self.args
        dist = None
        try:
            torch.set_num_threads(1)
            spec = parse_pipeline(a["spec"])
            device = self.device  # chosen in configure(): the GPU Ray assigned, or the CPU
            if device.type == "cuda":
                torch.cuda.set_device(device)  # this thread's current device (nccl, autocast, RNG)
            store = (self._store if a["rank"] == 0
                     else connect_store(addr[0], addr[1], a["world_size"]) if a["world_size"] > 1 else None)
            dist = Dist.init(rank=a["rank"], world_size=a["world_size"], addr=addr[0], port=addr[1], device=device,
                             backend=group_backend(a["use_gpu"]), store=store)
            inputs = {k: CheckpointRef.from_dict(v) for k, v in a["inputs"].items()}
            resume = CheckpointRef.from_dict(a["resume_from"]) if a["resume_from"] else None
            ctx = make_context(spec, a["stage_name"], run_id=a["run_id"], rank=a["rank"],
                               world_size=a["world_size"], inputs=inputs, device=device, state_dir=a["state_dir"])
            sspec = spec.stage(a["stage_name"])

            def make_harness(stage: Any, **extra: Any) -> Any:
                harness = Harness(stage, spec=spec, stage_name=a["stage_name"], run_id=a["run_id"],
                                  state_dir=Path(a["state_dir"]), dist=dist, exporter=self.exporter,
                                  inbox=self.inbox, resume_from=resume, skip=a["skip"],
                                  lr_multiplier=a["lr_multiplier"], fired_dir=Path(a["fired_dir"]), gpu=self.gpu,
                                  checkpoint_root=a["checkpoint_root"], **extra)
                with self._lock:
                    self.harness = harness
                    self.state = "running"
                return harness

            if sspec.kind == StageKind.LOOP.value:  # the user's loop runs inside the harness's session
                from trainguard.workers.runtime.loop import Guarded

                loop_fn = load_entrypoint(sspec.entrypoint, sspec.kind, UserCode.from_dict(a.get("user_code")))
                result = Guarded(ctx, make_harness).run(loop_fn)
            else:
                cls = (load_entrypoint(sspec.entrypoint, sspec.kind, UserCode.from_dict(a.get("user_code")))
                       if sspec.kind == StageKind.CUSTOM.value else STAGES[sspec.kind])
                harness = make_harness(cls(ctx))
                result = harness.run()
            self.state = result["state"]
            self._result = result
            return result
        except BaseException:
            self.state = "failed"
            self.error = traceback.format_exc(limit=20)
            raise
        finally:
            if dist is not None and self.state != "failed":
                dist.close()
            self._ended.set()

    def outcome(self) -> dict[str, Any]:
        """What `run()` returns, once it has (a supervisor that re-attaches to a detached group has
        no reference to the `run()` call another process made); raises when it failed."""
        self._ended.wait()
        if self._result is None:
            raise RuntimeError(self.error or f"rank {self.rank}: the loop failed")
        return self._result

    def identity(self) -> dict[str, Any]:
        """Who this rank is, for a supervisor re-attaching to it: its run, stage, rank, group size,
        process and actor, its state, the seq of its newest history record (the history it
        reads from then on) and the highest control seq it has seen (its new messages follow it)."""
        return {"run_id": self.args.get("run_id"), "stage": self.args.get("stage_name"), "rank": self.rank,
                "generation": self.args.get("generation"),
                "world_size": self.args.get("world_size"), "pid": os.getpid(),
                "actor_id": ray.get_runtime_context().get_actor_id(), "state": self.state,
                "history_seq": self.exporter.last_seq() if self.exporter is not None else -1,
                "control_seq": self.inbox.highest_seen()}

    def control(self, msg: dict[str, Any]) -> None:
        self.inbox.put(Control.from_dict(msg))

    def skip_controls(self, seq: int) -> list[int]:
        """See `ControlInbox.skip_to` (a supervisor re-attaching)."""
        return self.inbox.skip_to(seq)

    def status(self, since: int = -1) -> dict[str, Any]:
        """`since`: the seq of the last checkpoint report the caller has (see Harness.status)."""
        h = self.harness
        if h is None:
            return {"rank": self.rank, "step": 0, "state": self.state, "error": self.error,
                    "output_checkpoint": None, "last_checkpoint": None, "checkpoints": []}
        st = h.status(since)
        if self.state == "failed":
            st["state"] = "failed"
        st["error"] = self.error
        return st


def _warm_up() -> None:
    import torch

    import trainguard.workers.runtime.harness  # noqa: F401 - the heavy imports
    import trainguard.workers.stages  # noqa: F401
    from trainguard.workers.data import get_mixture

    torch.set_num_threads(1)
    get_mixture()
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    (p * p).sum().backward()
    opt.step()


def _at_lowest_priority(fn: Callable[[], None]) -> None:
    """Run `fn` in a new thread at nice 19 and wait for it; its exception is raised here. Linux
    sets niceness per thread, so the process's other threads (and a `run()` later) keep theirs;
    threads `fn` starts inherit 19 (`import torch` leaves one, idle while a rank trains).
    Elsewhere, or where it is refused, `fn` runs at the normal priority."""
    failed: list[BaseException] = []

    def body() -> None:
        try:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except (AttributeError, OSError):
                pass
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            failed.append(e)

    t = threading.Thread(target=body, name="warm-up", daemon=True)
    t.start()
    t.join()
    if failed:
        raise failed[0]


def node_id() -> str:
    """The Ray node this process runs on (hex id)."""
    return str(ray.get_runtime_context().get_node_id())


def dead_nodes() -> set[str]:
    """Ids of the Ray nodes the cluster knows as dead (removed, crashed, lost)."""
    try:
        return {str(n["NodeID"]) for n in ray.nodes() if not n.get("Alive", True)}
    except Exception:  # noqa: BLE001 - the GCS unreachable: nothing is known to be dead
        return set()


def unreachable_nodes(nodes: set[str], timeout: float = 1.0) -> set[str]:
    """Of `nodes`, those the GCS still lists as alive whose raylet accepts no connection (its
    process gone, or its host): lost, before Ray's health checks mark them dead."""
    if not nodes:
        return set()
    try:
        table = {str(n["NodeID"]): n for n in ray.nodes()}
    except Exception:  # noqa: BLE001 - the GCS unreachable: claim nothing
        return set()
    out: set[str] = set()
    for node in nodes:
        n = table.get(node)
        if n is None or not n.get("Alive", True) or not n.get("NodeManagerAddress") or not n.get("NodeManagerPort"):
            continue
        try:
            with socket.create_connection((str(n["NodeManagerAddress"]), int(n["NodeManagerPort"])), timeout=timeout):
                pass
        except OSError:
            out.add(node)
    return out


class WorkerGroup:
    """Handle on one stage's worker actors (one per rank). See docs/internals.md."""

    def __init__(self, *, run_id: str, spec: PipelineSpec, stage_name: str, state_dir: Path | str | None = None,
                 resume_from: CheckpointRef | None = None, skip: Iterable[Iterable[int]] = (),
                 lr_multiplier: float | None = None, inputs: dict[str, CheckpointRef] | None = None,
                 fired_dir: Path | str | None = None, bind_host: str | None = None,
                 checkpoint_root: str | None = None, user_code: dict[str, Any] | None = None,
                 shrink: bool = True) -> None:
        """`state_dir` defaults to $TRAINGUARD_STATE_DIR. `user_code`: the deployment's allow-list for
        custom and loop stages (workers/usercode.py UserCode.to_dict; None allows none). `lr_multiplier` None keeps the
        checkpoint's (or 1.0); a value replaces it. `skip` is added to the checkpoint's skip list.
        `resume_from` and `inputs` carry the hashes recorded when their checkpoints were
        reported: the workers load nothing else. `shrink`: a stage with `min_world_size` may start
        smaller than its world_size when that cannot be placed (False: the full size or
        InsufficientResources — what the driver asks for a stage's very first group)."""
        state_dir = state_dir or os.environ.get(STATE_DIR_ENV)
        if not state_dir:
            raise ValueError(f"state_dir is required (argument or ${STATE_DIR_ENV})")
        self.run_id = run_id
        self.spec = spec
        self.stage_name = stage_name
        self.stage_spec = spec.stage(stage_name)  # KeyError for an unknown stage
        self.world_size = self.stage_spec.world_size
        self.state_dir = Path(state_dir)
        self.fired_dir = Path(fired_dir) if fired_dir else self.state_dir / "runs" / run_id / "faults-fired"
        self._kwargs = dict(
            run_id=run_id, spec=spec.model_dump(mode="json"), stage_name=stage_name, world_size=self.world_size,
            state_dir=str(self.state_dir), resume_from=resume_from.to_dict() if resume_from else None,
            skip=[[int(a), int(b)] for a, b in skip], lr_multiplier=lr_multiplier,
            inputs={k: v.to_dict() for k, v in (inputs or {}).items()}, fired_dir=str(self.fired_dir),
            bind_host=bind_host, checkpoint_root=checkpoint_root, user_code=user_code)
        self._actors: list[Any] = []
        self._run_refs: list[Any] = []
        self._endpoint_refs: list[Any] = []
        self._endpoints: list[dict[str, Any]] | None = None
        self._seq = 0
        self._closed = False
        self._refill_due = False  # spares taken: the pool replaces them once this group is up (`poll`)
        self._up_steps: dict[int, int] | None = None  # each rank's step when all were first set up
        self._last: dict[str, Any] | None = None
        self._report_seq = -1  # the newest checkpoint report handed out (poll, checkpoint_reports)
        self._reports_lock = threading.Lock()
        self._pg: Any = None  # the group's placement group (a bundle per rank)
        self._spare_nodes: dict[int, str] = {}  # rank -> its node, known before its endpoint (spare, bundle)
        self.warm_spares = 0  # ranks of a gang-scheduled CPU group that came from the warm pool
        self.declared_world_size = self.world_size  # the stage's world_size; `world_size` is what start() placed
        self.shrink = shrink
        self.elastic: dict[str, Any] | None = None  # start() shrank the group: how the size was chosen
        self.generation = time.time_ns()  # names a detached group's actors apart from its predecessors'
        self._kwargs["generation"] = self.generation
        self.attached = False  # re-attached to a detached group a previous supervisor started
        self.history_seqs: dict[int, int] = {}  # re-attached: each rank's newest history record then
        self.identities: list[dict[str, Any]] = []  # re-attached: each rank's TrainWorker.identity()

    def start(self) -> None:
        """Reserve the group's placement group (a bundle per rank, all at once: waits up to
        $TRAINGUARD_PLACEMENT_WAIT_S, then raises InsufficientResources; an elastic stage's may
        hold fewer ranks: `_reserve_elastic`), take warm actors on the bundles' nodes (or create
        them in the bundles) and start their loops; returns without waiting for the loops."""
        assert not self._actors, "start() called twice"
        elastic = (self.shrink and self.stage_spec.min_world_size is not None
                   and self.stage_spec.min_world_size < self.world_size)
        # an elastic stage runs on GPUs when the cluster has GPUs for its smallest size
        use_gpu = plan_gpus(self.stage_spec.min_world_size if elastic else self.world_size, ray.cluster_resources())
        placement = self.stage_spec.placement
        cpus = placement.cpus(use_gpu)
        what = f"run {self.run_id} stage {self.stage_name}"
        token = _pg_name.set(self._name())  # a detached reservation is named after the group
        try:
            self._place(elastic, use_gpu, cpus, what)
        finally:
            _pg_name.reset(token)
        self._endpoint_refs = [a.configure.remote(rank=r, use_gpu=use_gpu, **self._kwargs)
                               for r, a in enumerate(self._actors)]
        addr = self._actors[0].rendezvous.remote(self.world_size)  # each run() starts once it resolves
        self._run_refs = [a.run.remote(addr, ep) for a, ep in zip(self._actors, self._endpoint_refs)]

    def _name(self, rank: int | None = None) -> str:
        base = f"{_group_prefix(self.run_id, self.stage_name)}{self.generation}"
        return base if rank is None else f"{base}/{rank}"

    def _place(self, elastic: bool, use_gpu: bool, cpus: float, what: str) -> None:
        placement = self.stage_spec.placement
        if elastic and (use_gpu or cpus > 0):
            self._pg = self._reserve_elastic(use_gpu, cpus, what)
        if use_gpu:
            # one GPU per rank, reserved together; spares would hold GPUs idle, so GPU ranks never
            # come from the pool
            if self._pg is None:
                self._pg = reserve_gpus(self.world_size, what, strategy=placement.strategy, cpus_per_rank=cpus)
            self._actors = [TrainWorker.options(num_gpus=1, num_cpus=cpus, **_detached_options(self._name(r)),
                                                scheduling_strategy=PlacementGroupSchedulingStrategy(
                                                    placement_group=self._pg, placement_group_bundle_index=r)).remote()
                            for r in range(self.world_size)]
        elif cpus <= 0:
            # gang scheduling turned off (placement.cpus_per_rank 0): 0-CPU spares wherever they are
            taken = warm_pool().take_with_nodes(self.world_size, refill=False)
            self._refill_due = True
            self._actors = [a for a, _ in taken]
            self._spare_nodes = {r: n for r, (_, n) in enumerate(taken) if n}
        else:
            if self._pg is None:
                self._pg = reserve([{"CPU": cpus} for _ in range(self.world_size)], placement.strategy, what)
            try:
                self._take_for_bundles(cpus)
            except BaseException:
                self.shutdown()  # no reservation (or actor) outlives a start that failed
                raise

    def _reserve_elastic(self, use_gpu: bool, cpus: float, what: str) -> Any:
        """An elastic stage's placement group (`reserve_elastic`): at full size, or shrunk to the
        largest size that fits (not below min_world_size). A smaller group is what the workers
        get: its rank count, the `world_size` every rank trains with, and — for pretrain and
        anneal without a micro_batch_size of their own — gradient accumulation that keeps each
        micro-step at the full-size share. The global batch (samples, loss) is unchanged."""
        placement, stage = self.stage_spec.placement, self.stage_spec
        assert stage.min_world_size is not None
        if use_gpu:
            bundle: dict[str, float] = {"GPU": 1, **({"CPU": cpus} if cpus > 0 else {})}
            wait = placement_wait_s(use_gpu=True)

            def message(ev: dict[str, Any]) -> str:
                return missing_gpus_message(what, int(ev["asked"]["bundles"]), ev["cluster"], ev["free"], wait)

            pg, placed, note = reserve_elastic(bundle, placement.strategy, what, self.world_size, stage.min_world_size,
                                               wait_s=wait, error=GpusUnavailable, message=message)
        else:
            pg, placed, note = reserve_elastic({"CPU": cpus}, placement.strategy, what, self.world_size,
                                               stage.min_world_size)
        if placed != self.world_size:
            micro = accumulation_micro_batch(stage.kind, stage.batch_size, stage.micro_batch_size, self.world_size,
                                             placed)
            spec = self._kwargs["spec"]
            if micro is not None:
                spec = {**spec, "stages": [{**st, "micro_batch_size": micro} if st.get("name") == self.stage_name
                                           else st for st in spec["stages"]]}
            self.world_size = placed
            self._kwargs.update(world_size=placed, spec=spec)
            self.elastic = {**(note or {}), "micro_batch_size": micro}
        return pg

    def _take_for_bundles(self, cpus: float) -> None:
        """Rank r: a warm spare already on bundle r's node (a 0-CPU actor: the bundle holds its
        CPUs), else a new actor inside bundle r."""
        on_nodes = warm_pool().take_on_nodes(bundle_nodes(self._pg, self.world_size), refill=False)
        self._refill_due = True
        self.warm_spares = sum(1 for spare, _ in on_nodes if spare is not None)
        for r, (spare, node) in enumerate(on_nodes):
            if spare is None:
                spare = TrainWorker.options(num_cpus=cpus, **_detached_options(self._name(r)),
                                            scheduling_strategy=PlacementGroupSchedulingStrategy(
                                                placement_group=self._pg, placement_group_bundle_index=r)).remote()
            if node:
                self._spare_nodes[r] = node
            self._actors.append(spare)

    def endpoints(self, timeout: float = 120.0) -> list[dict[str, Any]]:
        if self._endpoints is None:
            self._endpoints = ray.get(self._endpoint_refs, timeout=timeout)
        return list(self._endpoints)

    def control(self, kind: ControlKind | str, payload: dict[str, Any] | None = None, timeout: float = 10.0) -> int:
        """Deliver a control message to every live rank; they apply it at one agreed step."""
        self._seq += 1
        msg = Control(ControlKind(kind), self._seq, dict(payload or {})).to_dict()
        refs = [a.control.remote(msg) for a in self._actors]
        for ref in refs:
            try:
                ray.get(ref, timeout=timeout)
            except (RayActorError, GetTimeoutError):
                pass  # a dead rank: poll() reports it
        return self._seq

    def poll(self, timeout: float = 5.0) -> dict[str, Any]:
        """The group's state, and `checkpoints`: the CheckpointReports rank 0 made since the last poll.

        A rank counts as finished or stopped only once its `run()` has returned: its status may
        say "finished" a moment before (the result, with the output checkpoint, is still on
        its way), and a group called finished then would have no output."""
        status_refs = [a.status.remote(self._report_seq) for a in self._actors]
        ranks = [self._rank_info(r, ref, sref, timeout) for r, (ref, sref) in enumerate(zip(self._run_refs, status_refs))]
        self._add_nodes(ranks)
        reports = self._new_reports(ranks[0].pop("reports", []) if ranks else [])
        for i in ranks[1:]:
            i.pop("reports", None)
        state = group_state(ranks)
        if self._refill_due:
            self._up_steps, up = group_up(ranks, self._up_steps)
            if up:
                self._refill_pool()
        # a dead rank is the cause; the others' loops fail after it (a broken collective)
        failed = [i for i in ranks if not i["alive"]] or [i for i in ranks if i["state"] == "failed"]
        out = {
            "state": state,
            "ranks": [{k: i[k] for k in ("rank", "step", "state", "alive", "error", "node", "node_alive")}
                      for i in ranks],
            "output_checkpoint": ranks[0]["output_checkpoint"] if state == "finished" else None,
            "failed_rank": failed[0]["rank"] if failed else None,
            "error": failed[0]["error"] if failed else None,
            "checkpoints": reports,
            # once rank 0 returned: the incidents whose ROLLBACK it applied (each rank applies
            # a control at the same boundary, so rank 0 speaks for all)
            "rollbacks_applied": ranks[0]["rollbacks_applied"] if ranks else [],
        }
        self._last = out
        return out

    def _add_nodes(self, ranks: list[dict[str, Any]]) -> None:
        """Each rank's Ray node (from its endpoint, once configured) and, for a rank that died,
        whether its node is gone too (a node loss, not a worker loss)."""
        nodes: dict[int, str] = {}
        for r, ref in enumerate(self._endpoint_refs):
            if self._endpoints is not None:
                nodes[r] = str(self._endpoints[r].get("node") or "")
                continue
            done, _ = ray.wait([ref], timeout=0)
            if done:
                try:
                    nodes[r] = str(ray.get(ref).get("node") or "")
                except Exception:  # noqa: BLE001 - died before it was configured
                    pass
        gone: set[str] = set()
        if any(not i["alive"] or i["state"] == "failed" for i in ranks):
            # a rank died or the group broke (a peer's collective failed): which nodes are gone —
            # those the GCS knows as dead, and those whose raylet no longer answers (a node lost
            # a moment ago: Ray's health checks take ~15 s to say so, a peer's gloo error ~0 s)
            gone = dead_nodes()
            suspects = {nodes.get(i["rank"]) or self._spare_nodes.get(i["rank"]) or ""
                        for i in ranks if not i["alive"] or i.get("unreachable")} - gone - {""}
            gone |= unreachable_nodes(suspects)
        for i in ranks:
            node = nodes.get(i["rank"]) or self._spare_nodes.get(i["rank"])
            i["node"] = node or None
            if node and node in gone and i["alive"] and i.pop("unreachable", False):
                # its status could not be fetched and its node is gone: it died with it
                i.update(alive=False, state="failed", error=f"rank {i['rank']}: its Ray node {node} is gone")
            i.pop("unreachable", None)
            i["node_alive"] = None if not node or i["alive"] else node not in gone

    def _rank_info(self, r: int, ref: Any, sref: Any, timeout: float) -> dict[str, Any]:
        info: dict[str, Any] = {"rank": r, "step": None, "state": "running", "returned": False, "alive": True,
                                "error": None, "output_checkpoint": None, "reports": [],
                                "rollbacks_applied": []}
        done, _ = ray.wait([ref], timeout=0)
        if done:
            try:
                res = ray.get(ref)
                info.update(state=res["state"], step=res["step"], output_checkpoint=res["output_checkpoint"],
                            returned=True, reports=list(res.get("checkpoints", [])),
                            rollbacks_applied=list(res.get("rollbacks_applied", [])))
            except RayActorError as e:
                info.update(state="failed", alive=False, error=f"rank {r}: worker process died: {_short(e)}")
            except Exception as e:  # noqa: BLE001 - the loop raised: report, do not re-raise
                info.update(state="failed", error=f"rank {r}: {_short(e)}")
        if info["alive"]:
            try:
                st = ray.get(sref, timeout=timeout)
                info["step"] = st["step"]
                info["reports"] = [*info["reports"], *st.get("checkpoints", [])]
                if not done:
                    info["state"] = st["state"]
            except RayActorError as e:
                info.update(state="failed", alive=False, error=f"rank {r}: worker process died: {_short(e)}")
            except GetTimeoutError:
                info["error"] = f"rank {r}: status timed out"
                info["unreachable"] = True
        return info

    def checkpoint_reports(self, timeout: float = 5.0) -> list[CheckpointReport]:
        """The reports rank 0 made since they were last handed out (here or by `poll`), fetched
        now: a recovery decision must see the checkpoints written a moment ago."""
        if not self._actors:
            return []
        try:
            st = ray.get(self._actors[0].status.remote(self._report_seq), timeout=timeout)
        except (RayActorError, GetTimeoutError):
            return []
        return self._new_reports(st.get("checkpoints", []))

    def _new_reports(self, raw: list[dict[str, Any]]) -> list[CheckpointReport]:
        """Each report is handed out once, whichever thread (poll, a decision) fetched it."""
        reports = [CheckpointReport.from_dict(d) for d in raw]
        with self._reports_lock:
            out = {r.seq: r for r in reports if r.seq > self._report_seq}
            if out:
                self._report_seq = max(out)
        return [out[k] for k in sorted(out)]

    def _refill_pool(self) -> None:
        """Replace the spares this group took, now that its start no longer needs the CPU: a
        replacement's process start, imports and warm-up (~2 s of CPU) beside a group starting on
        the same cores slowed that start (a restarted group's checkpoint load took ~0.9 s instead
        of 15 ms on a 2-core machine, and its first step ~0.8 s when the refill came right after
        the load)."""
        self._refill_due = False
        warm_pool().refill()

    def shutdown(self) -> None:
        """Kill every actor (idempotent). Training state lives in checkpoints, not here."""
        if self._closed:
            return
        self._closed = True
        if self._refill_due:  # ended before it was up
            self._refill_pool()
        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self._pg is not None:
            try:
                remove_placement_group(self._pg)  # the CPUs / GPUs go back to other runs
            except Exception:  # noqa: BLE001 - already removed
                pass
            self._pg = None


def attach_group(*, run_id: str, spec: PipelineSpec, stage_name: str, state_dir: Path | str | None = None,
                 fired_dir: Path | str | None = None, timeout: float = 10.0, **kwargs: Any) -> WorkerGroup | None:
    """The detached group of `run_id`'s stage that a previous supervisor started, re-attached:
    the same actors (and processes), their loops untouched, nothing loaded; or None when there is
    none whole and alive (any leftovers are killed; the caller starts a group from a checkpoint).
    Its `poll()` sees the loops through `TrainWorker.outcome`, and its first poll hands out every
    checkpoint report rank 0 kept (up to the newest 1,000) — those made while no one listened."""
    if not _detached:
        return None
    prefix = _group_prefix(run_id, stage_name)
    gens: dict[int, dict[int, tuple[Any, dict[str, Any]]]] = {}
    for _, handle, ident in _detached_actors(timeout):
        if ident is None or ident.get("run_id") != run_id or ident.get("stage") != stage_name:
            continue
        gens.setdefault(int(ident.get("generation") or 0), {})[int(ident["rank"])] = (handle, ident)
    if not gens:
        return None
    newest = max(gens)
    group: WorkerGroup | None = None
    ranks = gens[newest]
    ids = [ranks[r][1] for r in sorted(ranks)]
    size = int(ids[0].get("world_size") or 0)
    if (sorted(ranks) == list(range(size)) and size > 0
            and all(i["state"] in ("running", "finished", "stopped") for i in ids)):
        group = WorkerGroup(run_id=run_id, spec=spec, stage_name=stage_name, state_dir=state_dir,
                            fired_dir=fired_dir, **kwargs)
        group.generation, group.world_size, group.attached = newest, size, True
        group._actors = [ranks[r][0] for r in range(size)]
        group._endpoint_refs = [a.endpoint.remote() for a in group._actors]
        group._run_refs = [a.outcome.remote() for a in group._actors]
        pg_id = _named_pgs().get(group._name())
        group._pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))) if pg_id else None
        group.history_seqs = {int(i["rank"]): int(i["history_seq"]) for i in ids}
        # the ranks dropped any control numbered at or below what they already saw; one the old
        # supervisor delivered to only some ranks (killed mid-call) was applied by none and would
        # hold the others' agreement forever: every rank takes the seqs up to there as dealt with
        group._seq = max(int(i.get("control_seq") or 0) for i in ids)
        if len({int(i.get("control_seq") or 0) for i in ids}) > 1:
            try:
                dropped = ray.get([a.skip_controls.remote(group._seq) for a in group._actors], timeout=timeout)
                log.warning("run %s stage %s: controls up to seq %d reached only some ranks; none applied them, "
                            "dropped (per rank: %s)", run_id, stage_name, group._seq, dropped)
            except (RayActorError, GetTimeoutError) as e:  # a rank died meanwhile: the poll reports it
                log.warning("run %s stage %s: dropping partly delivered controls failed: %s", run_id, stage_name, e)
        group.identities = ids
    # every other generation (and the newest when it is not whole and alive) is a leftover
    for gen, members in gens.items():
        if group is not None and gen == newest:
            continue
        for handle, _ in members.values():
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001 - gone meanwhile
                pass
        pg_id = _named_pgs().get(f"{prefix}{gen}")
        if pg_id:
            _remove_pg_id(pg_id)
    return group


def group_up(ranks: list[dict[str, Any]], set_up: dict[int, int] | None) -> tuple[dict[int, int] | None, bool]:
    """Whether a starting group is up: every rank trained a step after all were set up (their
    `step`s when all first left "starting": `set_up`, returned for the next poll), or one failed
    or ended. What the pool waits for before it replaces the spares the group took."""
    if any(not i["alive"] or i["state"] not in ("starting", "running", "paused") for i in ranks):
        return set_up, True
    if any(i["state"] == "starting" for i in ranks):
        return set_up, False
    steps = {int(i["rank"]): int(i["step"] or 0) for i in ranks}
    if set_up is None:
        return steps, False
    return set_up, all(steps[r] > set_up.get(r, 0) for r in steps)


def group_state(ranks: list[dict[str, Any]]) -> str:
    """One state for the group from its ranks' {"state", "alive", "returned"}: failed if any
    rank failed or died; finished/stopped only when every rank's run() has returned."""
    if any(not i["alive"] or i["state"] == "failed" for i in ranks):
        return "failed"
    states = {i["state"] for i in ranks}
    returned = all(i.get("returned") for i in ranks)
    if states == {"finished"} and returned:
        return "finished"
    if states <= {"stopped", "finished"} and returned:
        return "stopped"
    if "paused" in states:
        return "paused"
    return "running"


class WarmPool:
    """Spare CPU worker actors with torch imported and the corpora built, so a new or restarted
    worker group starts in about a second instead of paying a process start and the imports.
    They reserve no GPU, hide any they can see, and train on the CPU (CPU groups only).

    Size from $TRAINGUARD_WARM_WORKERS (default 2; 0 turns the pool off). Used actors are
    never returned: a process that trained (process group, allocator state) is not reused.

    Each spare is pinned (hard node affinity) to a node with CPUs, spread over those nodes, so
    its node is known from the start: a gang-scheduled group takes, for each of its bundles, a
    spare on that bundle's node (`take_on_nodes`).

    A group that took spares has them replaced once every rank of it trained a step
    (`group_up`, from `WorkerGroup.poll`; REFILL_FALLBACK_S at the latest), and a spare warms up at the lowest
    CPU priority (`TrainWorker.warm`): replacements started at once, at normal priority, took
    the CPU from the group starting beside them.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._timer: threading.Timer | None = None  # the fallback refill (`_replace_taken`)
        # (actor, its warm() ref: resolves to its node id, the node it was pinned to or None)
        self._idle: list[tuple[Any, Any, str | None]] = []
        self._lock = threading.Lock()

    def _checked(self) -> list[tuple[Any, Any, str | None]]:
        """Every idle spare that may be handed out (see `_usable`); the bad ones are killed."""
        with self._lock:
            idle, self._idle = self._idle, []
        usable, bad = _usable(idle, dead_nodes())
        for a in bad:
            _kill(a)
        return usable

    def _put_back(self, rest: list[tuple[Any, Any, str | None]]) -> None:
        with self._lock:
            self._idle = rest + self._idle

    def take_with_nodes(self, n: int, *, refill: bool = True) -> list[tuple[Any, str | None]]:
        """`n` actors, spares first, each with its node id when known. A spare whose warm-up
        failed (its process or node died) or that lives on a node the cluster knows as dead is
        dropped, never handed out; one still warming up is taken as it is."""
        usable = self._checked()
        got, rest = usable[:n], usable[n:]
        self._put_back(rest)
        out: list[tuple[Any, str | None]] = [(a, node) for a, _, node in got]
        out += [(TrainWorker.remote(), None) for _ in range(n - len(out))]
        self._replace_taken(refill)
        return out

    def take_on_nodes(self, nodes: list[str | None], *, refill: bool = True) -> list[tuple[Any | None, str | None]]:
        """For each wanted node, a spare known to live there (warm or still warming up), or
        (None, node) when there is none: the caller creates that rank in its bundle."""
        usable = self._checked()
        out: list[tuple[Any | None, str | None]] = []
        for want in nodes:
            i = next((k for k, (_, _, node) in enumerate(usable) if want is not None and node == want), None)
            out.append((usable.pop(i)[0], want) if i is not None else (None, want))
        self._put_back(usable)
        self._replace_taken(refill)
        return out

    def idle(self) -> int:
        """How many spares wait in the pool (warm or still warming up)."""
        with self._lock:
            return len(self._idle)

    def _replace_taken(self, now: bool) -> None:
        """`refill` now, or — the taker refills once its group is up (`WorkerGroup.poll`) — at
        the latest REFILL_FALLBACK_S from now, for a group nobody polls."""
        if now:
            self.refill()
            return
        with self._lock:
            if self._timer is not None and self._timer.is_alive():
                return
            self._timer = threading.Timer(REFILL_FALLBACK_S, self._refill_quietly)
            self._timer.daemon = True
            self._timer.start()

    def _refill_quietly(self) -> None:
        try:
            if ray.is_initialized():
                self.refill()
        except Exception as e:  # noqa: BLE001 - Ray going down: the next take refills
            log.warning("warm pool: refill failed: %s", e)

    def refill(self) -> None:
        with self._lock:
            if self._timer is not None:  # refilled: the fallback a take scheduled is moot
                self._timer.cancel()
                self._timer = None
            missing = self.size - len(self._idle)
            if missing <= 0:
                return
            nodes = _spare_nodes_for(missing, [n for _, _, n in self._idle])
            for node in nodes:
                opts: dict[str, Any] = {}
                if node is not None:
                    opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
                # detached mode: a spare outlives the supervisor too (a group may take it)
                a = TrainWorker.options(**opts, **_detached_options(f"spare/{uuid.uuid4().hex[:16]}")).remote()
                self._idle.append((a, a.warm.remote(), node))

    def close(self) -> None:
        with self._lock:
            idle, self._idle = [a for a, _, _ in self._idle], []
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for a in idle:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


def _usable(idle: list[tuple[Any, Any, str | None]],
            dead: set[str]) -> tuple[list[tuple[Any, Any, str | None]], list[Any]]:
    """Split spares into usable (actor, warm ref, node: where it was pinned, or where it warmed
    up, or None while an unpinned one warms up) and bad ones (warm-up failed, or on a dead node)."""
    usable: list[tuple[Any, Any, str | None]] = []
    bad: list[Any] = []
    for a, ref, pinned in idle:
        if pinned is not None and pinned in dead:
            bad.append(a)
            continue
        done, _ = ray.wait([ref], timeout=0)
        if not done:
            usable.append((a, ref, pinned))
            continue
        try:
            node = str(ray.get(ref))
        except Exception:  # noqa: BLE001 - its process (or node) died while warming up
            bad.append(a)
            continue
        if node in dead:
            bad.append(a)
        else:
            usable.append((a, ref, node))
    return usable, bad


def _cpu_nodes() -> list[str]:
    """Alive nodes that have CPUs (where ranks can be placed), in a stable order."""
    try:
        return sorted(str(n["NodeID"]) for n in ray.nodes()
                      if n.get("Alive", True) and float((n.get("Resources") or {}).get("CPU", 0)) > 0)
    except Exception:  # noqa: BLE001 - the GCS unreachable: let Ray place them
        return []


def _spare_nodes_for(n: int, have: list[str | None]) -> list[str | None]:
    """Nodes for `n` new spares: each on the CPU node with the fewest spares so far (None: no
    CPU node known, Ray places it)."""
    nodes = _cpu_nodes()
    if not nodes:
        return [None] * n
    count = {node: sum(1 for h in have if h == node) for node in nodes}
    out: list[str | None] = []
    for _ in range(n):
        node = min(nodes, key=lambda x: (count[x], nodes.index(x)))
        count[node] += 1
        out.append(node)
    return out


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


_POOL: WarmPool | None = None
REFILL_FALLBACK_S = 5.0  # a group that took spares refills the pool once up; this, at the latest (an unpolled one)


def warm_pool() -> WarmPool:
    """The process's pool (created on first use, after ray.init)."""
    global _POOL
    if _POOL is None:
        _POOL = WarmPool(int(os.environ.get("TRAINGUARD_WARM_WORKERS", "2")))
    return _POOL


def _short(e: BaseException, limit: int = 2000) -> str:
    s = str(e).strip()
    return s if len(s) <= limit else s[:limit] + " ..."
