"""The benchmarks, in the order a full run executes them (cheap, in-process ones first)."""
from __future__ import annotations

import importlib

ORDER = [
    "checkpoint_stall",
    "monitoring_overhead",
    "train_throughput",
    "supervisor_scale",
    "api_latency",
    "detection_quality",
    "recovery_loss_spike",
    "recovery_worker_crash",
    "recovery_node_loss",
    "detection_latency",
    "goodput",
    "quiet_healthy",
]

MODULES = [
    "tests.bench.b_checkpoint",
    "tests.bench.b_overhead",
    "tests.bench.b_throughput",
    "tests.bench.b_scale",
    "tests.bench.b_api",
    "tests.bench.b_recovery",
    "tests.bench.b_node_loss",
    "tests.bench.b_detection",
    "tests.bench.b_detection_quality",
    "tests.bench.b_goodput",
    "tests.bench.b_quiet",
]


def load_all() -> None:
    for m in MODULES:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:
            if e.name != m:
                raise

