"""Worker runtime: the step loop and everything around a stage's objective."""
from __future__ import annotations

from trainguard.workers.runtime.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    list_checkpoints,
    load_checkpoint,
    read_manifest,
    verify_checkpoint,
)
from trainguard.workers.runtime.control import ControlInbox
from trainguard.workers.runtime.distributed import Dist
from trainguard.workers.runtime.exporter import Exporter
from trainguard.workers.runtime.faults import FaultInjector
from trainguard.workers.runtime.gpu import FakeNvmlGpuHealth, GpuHealth, NvmlGpuHealth, make_gpu_health
from trainguard.workers.runtime.guard import Guard, SpikeScorer
from trainguard.workers.runtime.harness import Harness, make_context, metrics_log_path

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
