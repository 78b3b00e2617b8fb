"""Process group set-up and the two collectives the step loop needs.

gloo on CPU, nccl on CUDA; rendezvous over tcp:// on a port the WorkerGroup picks.
With world_size == 1 nothing is initialised and every collective is the identity.

The group decides, not each rank: the WorkerGroup chooses GPU or CPU for all its ranks
(`group_backend`), and a rank uses CUDA only when Ray assigned it a GPU
(`rank_device(use_gpu, ray.get_gpu_ids(), ...)`). A rank that merely sees GPUs — Ray no
longer clears CUDA_VISIBLE_DEVICES for actors given no GPU (ray-project/ray#54868; Ray 2.60
here) — trains on the CPU, so every rank of a group lands on one backend.
"""
from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist

__all__ = ["Dist", "free_port", "local_ip", "group_backend", "rank_device", "cuda_ordinal", "PARALLEL_STRATEGIES",
           "transformer_blocks", "wrap_model", "is_sharded", "full_state_dicts", "load_full_state_dicts"]

PARALLEL_STRATEGIES = ("none", "ddp", "fsdp")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_store(host: str, world_size: int, timeout_s: float = 600.0) -> Any:
    """Rank 0's rendezvous store, listening on a free port of `host` (`.port`) before any rank
    calls `Dist.init`: the others connect at once, and no port is picked first and bound later."""
    return dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def connect_store(host: str, port: int, world_size: int, timeout_s: float = 600.0) -> Any:
    """A client of rank 0's store (`serve_store`), for the other ranks' `Dist.init`."""
    return dist.TCPStore(host, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


def local_ip() -> str:
    """The address other nodes reach this one on (127.0.0.1 when there is no network)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def group_backend(use_gpu: bool) -> str:
    """One backend for every rank of a group: nccl when the group runs on GPUs, else gloo."""
    return "nccl" if use_gpu else "gloo"


def cuda_ordinal(gpu_id: str | int, visible_devices: str | None) -> int:
    """The CUDA ordinal, in this process, of the GPU Ray assigned (`ray.get_gpu_ids()`).
    Ray sets CUDA_VISIBLE_DEVICES to the assigned ids, which makes it ordinal 0; with that
    variable not set by Ray (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES), the id is the
    position in the variable the process started with, or the physical ordinal."""
    gid = str(gpu_id).strip()
    if visible_devices is None:
        return int(gid)
    entries = [v.strip() for v in visible_devices.split(",") if v.strip()]
    if gid in entries:
        return entries.index(gid)
    raise RuntimeError(f"GPU {gid} assigned by Ray is not among CUDA_VISIBLE_DEVICES={visible_devices!r}")


def rank_device(use_gpu: bool, gpu_ids: Iterable[str | int], *, cuda_available: bool,
                visible_devices: str | None) -> torch.device:
    """This rank's device. CPU unless the group runs on GPUs; then the GPU Ray assigned to
    this rank — a GPU group whose rank got none, or cannot use it, fails loudly instead of
    training on some GPU it was not given or on the CPU next to nccl ranks."""
    ids = sorted(str(i) for i in gpu_ids)
    if not use_gpu:
        return torch.device("cpu")
    if not ids:
        raise RuntimeError("GPU worker group, but Ray assigned this rank no GPU (ray.get_gpu_ids() is empty)")
    if not cuda_available:
        raise RuntimeError(f"Ray assigned GPU {ids[0]} but torch.cuda.is_available() is False "
                           "(a CPU build of torch, or no driver in this image)")
    return torch.device("cuda", cuda_ordinal(ids[0], visible_devices))


@dataclass
class Dist:
    """This rank's view of the process group."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def init(cls, *, rank: int, world_size: int, addr: str, port: int, device: torch.device,
             timeout_s: float = 600.0, backend: str | None = None, store: Any = None) -> "Dist":
        """`backend`: the group's (`group_backend`); by default the one `device` implies.
        `store`: rank 0's own (`serve_store`), listening before any rank gets here, or another
        rank's client of it (`connect_store`): every rank then connects at once. Without one rank
        0 opens the store at init, and a rank that comes first waits out torch's connect retries
        (0.5-1.2 s measured on this project's machine), not just for rank 0."""
        backend = backend or group_backend(device.type == "cuda")
        if (backend == "nccl") != (device.type == "cuda"):
            raise ValueError(f"rank {rank}: backend {backend} with device {device}: a group runs on one kind of device")
        if world_size > 1:
            timeout = datetime.timedelta(seconds=timeout_s)
            if store is not None:
                dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
            else:
                dist.init_process_group(backend=backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                                        world_size=world_size, timeout=timeout)
        return cls(rank=rank, world_size=world_size, device=device)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def all_reduce_grads(self, params: list[torch.nn.Parameter], local_flag: float) -> float:
        """Average gradients across ranks in one flat buffer; returns the SUM of `local_flag`
        over ranks (the guard's "some rank saw a non-finite loss" vote), in the same collective."""
        if not self.enabled:
            return local_flag
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads]
                         + [torch.tensor([local_flag], dtype=torch.float32, device=grads[0].device)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flag = float(flat[-1].item())
        flat = flat[:-1] / self.world_size
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            piece = flat[offset:offset + n].view_as(g).to(g.dtype)
            if p.grad is None:
                p.grad = piece.clone()
            else:
                p.grad.copy_(piece)
            offset += n
        return flag

    def sum_float(self, value: float) -> float:
        """All-reduce SUM of one float (the guard's non-finite vote when DDP or FSDP2 averaged
        the gradients during backward)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def min_int(self, value: int) -> int:
        """All-reduce MIN of one integer (the control agreement)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def gather_to_rank0(self, obj: object) -> list[object] | None:
        """Every rank's `obj` on rank 0 (a list indexed by rank), None elsewhere."""
        if not self.enabled:
            return [obj]
        out: list[object] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast_from_rank0(self, obj: object) -> object:
        """Rank 0's `obj` on every rank (collective). Between a group's own ranks only: the
        objects travel pickled."""
        if not self.enabled:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def new_group(self, backend: str = "gloo") -> Any:
        """A process group over every rank, beside the default one (collective: every rank calls
        it, in the same order); None at world size 1. The checkpoint traffic runs on its own."""
        if not self.enabled:
            return None
        return dist.new_group(backend=backend)


# -- model wrapping (stage option `parallel.strategy`) ----------------------------------------
def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated decoder blocks of `model`, each its own FSDP2 unit: the built-in GPT's
    `blocks` (also inside a RewardModel's backbone), a Hugging Face model's decoder layers
    (`HFCausalLM.hf.model.layers`, via `base_model.layers`)."""
    from trainguard.workers.model import GPT  # lazy: the model imports the spec, not the runtime

    out: list[torch.nn.Module] = []
    for m in model.modules():
        if isinstance(m, GPT):
            out.extend(m.blocks)
        elif getattr(m, "is_causal_lm", False) and hasattr(m, "hf"):
            layers = getattr(getattr(m.hf, "base_model", m.hf), "layers", None)
            if layers is not None:
                out.extend(layers)
    return out


def wrap_model(model: torch.nn.Module, strategy: str, d: Dist, *,
               param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Apply `strategy` to `model` in place (the stage keeps calling the same object, its
    state-dict keys unchanged) and return it. Must run before the optimizer is built: FSDP2
    replaces the parameters with sharded DTensors.

    none: nothing (the harness all-reduces the gradients itself, `Dist.all_reduce_grads`).
    ddp: composable DDP (`torch.distributed._composable.replicate`): gradients averaged in
    buckets during backward. fsdp: FSDP2 `fully_shard` on each transformer block, then on the
    root (embeddings, final norm, tied head, any head); `param_dtype` (bf16 on GPU) sets a
    MixedPrecisionPolicy with fp32 gradient reduction. At world size 1 every strategy is none."""
    if strategy not in PARALLEL_STRATEGIES:
        raise ValueError(f"parallel.strategy must be one of {list(PARALLEL_STRATEGIES)}, not {strategy!r}")
    if strategy == "none" or not d.enabled:
        return model
    if strategy == "ddp":
        from torch.distributed._composable.replicate import replicate

        kw: dict[str, Any] = {"device_ids": [d.device]} if d.device.type == "cuda" else {}
        # a trained parameter may get no gradient in a step (an HF reward model's unused
        # lm_head): DDP must not wait for it. Its grad stays None, so AdamW leaves it alone.
        replicate(model, find_unused_parameters=True, **kw)
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    mp = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
          if param_dtype is not None else MixedPrecisionPolicy())
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _param_fqns(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in the optimizer's order (its state-dict ids)."""
    names = {id(p): n for n, p in model.named_parameters()}  # a tied weight under its first name
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                     ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Collective (every rank calls it): the full, unsharded model and optimizer state dicts of
    an FSDP2 model, on the CPU, on rank 0 (None elsewhere) — in the formats of an unsharded
    `model.state_dict()` and `optimizer.state_dict()` (ids, not names), so a checkpoint of a
    sharded model is the same file as an unsharded one's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if not optimizer.state:
        # no optimizer step yet: get_state_dict would create the state with a zero-gradient
        # step (AdamW's `step` becomes 1), which an unsharded run never does
        msd = get_model_state_dict(model, options=options)
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return dict(msd), optimizer.state_dict()
    msd, osd = get_state_dict(model, optimizer, options=options)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    ids = {f: i for i, f in enumerate(_param_fqns(model, optimizer))}
    groups = [{**g, "params": [ids[f] for f in g["params"]]} for g in osd["param_groups"]]
    return dict(msd), {"state": {ids[f]: v for f, v in osd["state"].items()}, "param_groups": groups}


def load_full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          model_state: dict[str, Any], optim_state: dict[str, Any]) -> None:
    """Collective: load full state dicts (as `full_state_dicts` returns them; every rank holds
    them) into an FSDP2 model and its optimizer, each rank keeping its shard."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    if not optim_state["state"]:  # saved before the first optimizer step (see full_state_dicts)
        set_model_state_dict(model, dict(model_state), options=StateDictOptions(full_state_dict=True))
        optimizer.load_state_dict(optim_state)
        return
    fqns = _param_fqns(model, optimizer)
    # copies: set_*_state_dict put the sharded tensors into the dicts they are given
    osd = {"state": {fqns[int(i)]: dict(v) for i, v in optim_state["state"].items()},
           "param_groups": [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in optim_state["param_groups"]]}
    set_model_state_dict(model, dict(model_state), options=StateDictOptions(full_state_dict=True))
    # strict=False for the optimizer only: a parameter that never got a gradient (an HF reward
    # model's unused lm_head) has no optimizer state, as in optimizer.load_state_dict
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True, strict=False))
