"""Process group set-up and the two collectives the step loop needs.

gloo on CPU, nccl on CUDA; rendezvous over tcp:// on a port the WorkerGroup picks.
With world_size == 1 nothing is initialised and every collective is the identity.
"""
from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "free_port", "local_ip"]


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
             timeout_s: float = 600.0) -> "Dist":
        if world_size > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
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
