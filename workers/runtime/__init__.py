"""Worker runtime: the step loop and everything around a stage's objective."""
from __future__ import annotations

from workers.runtime.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    list_checkpoints,
    load_checkpoint,
    read_manifest,
    verify_checkpoint,
)
from workers.runtime.control import ControlInbox
from workers.runtime.distributed import Dist
from workers.runtime.exporter import Exporter
from workers.runtime.faults import FaultInjector
from workers.runtime.gpu import FakeNvmlGpuHealth, GpuHealth, NvmlGpuHealth, make_gpu_health
from workers.runtime.guard import Guard, SpikeScorer
from workers.runtime.harness import Harness, make_context, metrics_log_path

__all__ = [
    "CheckpointError",
    "CheckpointWriter",
    "ControlInbox",
    "Dist",
    "Exporter",
    "FakeNvmlGpuHealth",
    "FaultInjector",
    "GpuHealth",
    "Guard",
    "Harness",
    "NvmlGpuHealth",
    "SpikeScorer",
    "list_checkpoints",
    "load_checkpoint",
    "make_context",
    "make_gpu_health",
    "metrics_log_path",
    "read_manifest",
    "verify_checkpoint",
]
