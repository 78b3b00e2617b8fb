"""monitoring_overhead: step time with the exporter, guard and control channel on vs a bare loop.

Ours: the real `Harness` loop (one rank, in-process): exporter HTTP server serving
/metrics and /history while a scraper thread reads both every 0.5 s (as the embedded
supervisor does), the guard's spike scoring, the control inbox agreement at every step
boundary, the fault hooks, per-step metrics, history ring buffer and JSONL log.
Checkpoints and evaluation are pushed past the measured steps (they have their own
benchmark). Baseline: the bare loop a training script would have — same stage, same
AdamW parameter groups, same LR schedule, clip_grad_norm_ — and nothing else.

Both loops run in alternating blocks (bare, ours, bare, ours) so drift in the shared
machine's load hits both; the figure is the median per-step wall time (time between
consecutive step ends, so everything the loop does between steps counts).
"""
from __future__ import annotations

import statistics
import threading
import time
import urllib.request

import torch

from tests.bench.core import Context, Measurement, benchmark
from tests.bench.workload import pipeline


def _spec(smoke: bool, steps: int):
    return pipeline(size="tiny" if smoke else "small", steps=steps, world_size=1, batch_size=8 if smoke else 16,
                    every=10_000_000, eval_every=10_000_000)


def _ours(spec, state_dir, warmup: int) -> list[float]:
    from trainguard.workers.runtime.harness import Harness, make_context
    from trainguard.workers.stages import STAGES

    ctx = make_context(spec, "pretrain", run_id="bench-overhead")
    stage = STAGES["pretrain"](ctx)
    ends: list[float] = []
    h = Harness(stage, spec=spec, stage_name="pretrain", run_id="bench-overhead", state_dir=state_dir,
                checkpoint_root=str(state_dir / "checkpoints"), on_step=lambda _h: ends.append(time.perf_counter()))
    port = h.exporter.start("127.0.0.1")
    stop = threading.Event()

    def scrape() -> None:
        seq = -1
        while not stop.wait(0.5):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/history?since={seq}", timeout=2).read()
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
            except OSError:
                pass

    t = threading.Thread(target=scrape, daemon=True)
    t.start()
    try:
        h.run()
    finally:
        stop.set()
        t.join(timeout=5)
        h.exporter.close()
    return [b - a for a, b in zip(ends[warmup:], ends[warmup + 1:])]


def _bare(spec, warmup: int) -> list[float]:
    from trainguard.workers.runtime.harness import make_context, schedule_lr
    from trainguard.workers.stages import STAGES

    s = spec.stage("pretrain")
    ctx = make_context(spec, "pretrain", run_id="bench-overhead")
    stage = STAGES["pretrain"](ctx)
    params = [p for p in stage.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=s.lr, betas=(0.9, 0.95))
    mixture = dict(s.mixture)
    ends: list[float] = []
    for step in range(s.steps):
        lr = schedule_lr(step, base=s.lr, total=s.steps, warmup=s.warmup_steps, min_ratio=s.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss = stage.step(step, step, mixture).loss.float()
        float(loss.detach())  # every loop logs its loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        ends.append(time.perf_counter())
    return [b - a for a, b in zip(ends[warmup:], ends[warmup + 1:])]


@benchmark("monitoring_overhead", reps=3, smoke_reps=1)
def monitoring_overhead(ctx: Context) -> dict[str, Measurement]:
    """Per-step time with exporter + guard + control channel vs the bare loop."""
    torch.set_num_threads(1)
    steps = 12 if ctx.smoke else 60
    warmup = 2 if ctx.smoke else 5
    blocks = 1 if ctx.smoke else 2
    spec = _spec(ctx.smoke, steps)
    ours: list[float] = []
    bare: list[float] = []
    for b in range(blocks):
        bare += _bare(spec, warmup)
        ours += _ours(spec, ctx.sub(f"overhead-{b}"), warmup)
    o, r = statistics.median(ours), statistics.median(bare)
    return {"monitoring_overhead": Measurement(o, r, "s/step", "bare training loop",
                                               extra={"ours_mean_s": statistics.fmean(ours),
                                                      "bare_mean_s": statistics.fmean(bare)})}
