"""The Ray Train baseline: the same GPT pretraining workload under `TorchTrainer`.

What a Ray Train user writes for fault tolerance (Ray Train V2 API, Ray 2.60):
`RunConfig(failure_config=FailureConfig(max_failures=N), checkpoint_config=CheckpointConfig(...))`,
`ray.train.report(metrics, checkpoint=Checkpoint.from_directory(...))` every `every`
steps, `ray.train.get_checkpoint()` at the top of the training function. On a worker
failure Ray Train tears the whole worker group down, starts a new one and calls the
training function again, which resumes from the latest reported checkpoint.

Same model, data, batch, optimizer, LR schedule and gradient all-reduce as ours
(`workers.stages.pretrain.PretrainStage`, the harness's flat all-reduce); the crash is
the same `os._exit(1)` of one rank before it trains batch `at_step`, fired once
(a marker file written just before, holding the kill time).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def train_func(config: dict[str, Any]) -> None:
    import torch

    import ray.train
    from ray.train import Checkpoint
    from trainguard.workers.runtime.distributed import Dist
    from trainguard.workers.runtime.harness import make_context, schedule_lr
    from trainguard.workers.spec import parse_pipeline
    from trainguard.workers.stages import STAGES

    torch.set_num_threads(1)
    tctx = ray.train.get_context()
    rank, ws = tctx.get_world_rank(), tctx.get_world_size()
    spec = parse_pipeline(config["spec"])
    s = spec.stage("pretrain")
    sctx = make_context(spec, "pretrain", run_id="raytrain", rank=rank, world_size=ws, device=torch.device("cpu"))
    stage = STAGES["pretrain"](sctx)
    params = [p for p in stage.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=s.lr, betas=(0.9, 0.95))
    dist = Dist(rank=rank, world_size=ws, device=torch.device("cpu"))
    start = 0
    ck = ray.train.get_checkpoint()
    if ck is not None:
        with ck.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=False)
        stage.model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = int(state["step"])
    log = open(Path(config["log_dir"]) / f"rank{rank}.jsonl", "a", buffering=1)
    crashes = [(int(a), int(r)) for a, r in config.get("crashes", [])]
    fired = Path(config["fired_dir"])
    fired.mkdir(parents=True, exist_ok=True)
    mixture = dict(s.mixture)
    every = int(config["every"])
    for step in range(start, s.steps):
        t0 = time.perf_counter()
        for i, (at, r) in enumerate(crashes):
            marker = fired / f"fired-worker_crash-{i}"
            if step == at and rank == r and not marker.exists():
                marker.write_text(f"{time.time()}\n")
                os._exit(1)
        lr = schedule_lr(step, base=s.lr, total=s.steps, warmup=s.warmup_steps, min_ratio=s.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss = stage.step(step, step, mixture).loss.float()
        loss_value = float(loss.detach())
        loss.backward()
        dist.all_reduce_grads(params, 0.0)
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        if s.step_delay:
            time.sleep(s.step_delay)
        secs = time.perf_counter() - t0
        log.write(json.dumps({"step": step + 1, "batch_index": step, "time": time.time(), "step_seconds": secs,
                              "loss": loss_value, "pid": os.getpid(), "rank": rank}) + "\n")
        if (step + 1) % every == 0 or step + 1 == s.steps:
            if rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    torch.save({"model": stage.model.state_dict(), "optimizer": opt.state_dict(),
                                "rng": torch.get_rng_state(), "step": step + 1}, Path(d) / "state.pt")
                    ray.train.report({"step": step + 1, "loss": loss_value}, checkpoint=Checkpoint.from_directory(d))
            else:
                ray.train.report({"step": step + 1, "loss": loss_value})
    log.close()


def run_raytrain(spec: Any, workdir: Path, *, crashes: list[tuple[int, int]], every: int,
                 max_failures: int, func: Any = None, placement_strategy: str = "PACK") -> dict[str, Any]:
    """Run the workload to completion under TorchTrainer (`func`, default `train_func`; its ranks
    placed with `placement_strategy`, one CPU each); returns paths and timings."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    log_dir, fired = workdir / "logs", workdir / "fired"
    log_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"spec": spec.model_dump(mode="json"), "log_dir": str(log_dir), "fired_dir": str(fired),
           "crashes": [list(c) for c in crashes], "every": every}
    trainer = TorchTrainer(
        func or train_func, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=spec.stage("pretrain").world_size, use_gpu=False,
                                     resources_per_worker={"CPU": 1}, placement_strategy=placement_strategy),
        run_config=RunConfig(name=f"bench-{workdir.name}", storage_path=str(workdir / "storage"),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=3)),
    )
    t0 = time.time()
    result = trainer.fit()
    t1 = time.time()
    return {"log": log_dir / "rank0.jsonl", "log_dir": log_dir, "fired_dir": fired, "started": t0, "ended": t1,
            "error": getattr(result, "error", None)}


# -- on a multi-node cluster (recovery_node_loss) ----------------------------------------------------
def train_func_on_node(config: dict[str, Any]) -> None:
    """`train_func`, after writing which node and process this rank runs on
    (`{log_dir}/node-rank{rank}-{pid}.json`): the benchmark removes the node of rank 1."""
    import ray
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    info = {"rank": rank, "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "time": time.time()}
    (Path(config["log_dir"]) / f"node-rank{rank}-{os.getpid()}.json").write_text(json.dumps(info))
    train_func(config)


def rank_nodes(log_dir: Path) -> list[dict[str, Any]]:
    """What `train_func_on_node` wrote, oldest first (one entry per rank per attempt)."""
    out = []
    for p in Path(log_dir).glob("node-rank*-*.json"):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue  # being written
    return sorted(out, key=lambda r: r["time"])


def run_raytrain_on_cluster(spec: Any, workdir: Path, *, every: int, max_failures: int,
                            placement_strategy: str = "SPREAD") -> dict[str, Any]:
    """`run_raytrain` for a connected multi-node cluster: no injected crash, the ranks placed with
    `placement_strategy` and recording their nodes (`train_func_on_node`)."""
    return run_raytrain(spec, workdir, crashes=[], every=every, max_failures=max_failures,
                        func=train_func_on_node, placement_strategy=placement_strategy)
