"""Helpers shared by the tests and the benchmarks (no pytest import: `python -m tests.bench` uses it)."""
from __future__ import annotations

import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout the tests run from


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL (idempotent)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def spawn_gloo_ranks(worker, world: int, out: Path) -> Path:
    """Run `worker(rank, port, out_dir)` in `world` processes (torch.multiprocessing, no Ray);
    `port` is a free localhost port for their gloo rendezvous. Returns `out`."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(out)), nprocs=world, join=True)
    return out
