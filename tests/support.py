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
