"""The training workload every Ray benchmark shares: GPT pretraining on the stdlib corpora.

Sizes (CPU, one torch thread per rank, 2 shared cores):
- tiny  (smoke): 1 layer, d_model 32, seq 32, global batch 8  -> ~10 ms/step
- small (full):  2 layers, d_model 128, seq 64, global batch 8 -> ~30-60 ms/step with 2 ranks
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from trainguard.workers.spec import PipelineSpec, parse_pipeline

MODELS = {
    "tiny": {"n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 32},
    "small": {"n_layer": 2, "n_head": 4, "d_model": 128, "seq_len": 64},
    "medium": {"n_layer": 4, "n_head": 4, "d_model": 256, "seq_len": 128},
}


def size_for(smoke: bool) -> str:
    return "tiny" if smoke else "small"


def pipeline(*, name: str = "bench", size: str = "tiny", steps: int = 100, world_size: int = 2, batch_size: int = 8,
             every: int = 10, keep_last: int = 5, faults: list[dict] | None = None, step_delay: float = 0.0,
             eval_every: int = 1000, seed: int = 11, storage: str | None = None) -> PipelineSpec:
    stage: dict[str, Any] = {
        "name": "pretrain", "kind": "pretrain", "steps": steps, "world_size": world_size, "batch_size": batch_size,
        "lr": 3e-3, "warmup_steps": 5, "eval_every": eval_every, "eval_batches": 1, "faults": faults or [],
        "step_delay": step_delay,
    }
    ck: dict[str, Any] = {"every": every, "keep_last": keep_last}
    if storage:
        ck["storage"] = storage
    return parse_pipeline({"name": name, "seed": seed, "model": MODELS[size], "checkpoint": ck, "stages": [stage]})


def metrics_log(state_dir: Path, run_id: str, rank: int = 0, stage: str = "pretrain") -> Path:
    from trainguard.workers.runtime.harness import metrics_log_path

    return metrics_log_path(Path(state_dir), run_id, stage, rank)


def fired_time(fired_dir: Path, kind: str) -> float | None:
    """When a `once` fault fired: its marker file holds time.time() written just before it fired."""
    ms = sorted(Path(fired_dir).glob(f"fired-{kind}-*")) if Path(fired_dir).exists() else []
    for m in ms:
        try:
            return float(m.read_text().strip())
        except (OSError, ValueError):
            continue
    return None
