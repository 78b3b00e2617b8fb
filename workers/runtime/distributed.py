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
from typing import Iterable

import torch
import torch.distributed as dist

__all__ = ["Dist", "free_port", "local_ip", "group_backend", "rank_device", "cuda_ordinal"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
             timeout_s: float = 600.0, backend: str | None = None) -> "Dist":
        """`backend`: the group's (`group_backend`); by default the one `device` implies."""
        backend = backend or group_backend(device.type == "cuda")
        if (backend == "nccl") != (device.type == "cuda"):
            raise ValueError(f"rank {rank}: backend {backend} with device {device}: a group runs on one kind of device")
        if world_size > 1:
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://{addr}:{port}",
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
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

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()
