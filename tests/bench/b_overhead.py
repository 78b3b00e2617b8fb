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
import time

import torch

from tests.bench.core import Context, Measurement, benchmark
from tests.bench.shared import bare_loop, scraped
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
    try:
        with scraped(port):
            h.run()
    finally:
        h.exporter.close()
    return [b - a for a, b in zip(ends[warmup:], ends[warmup + 1:])]


def _bare(spec, warmup: int) -> list[float]:
    ends: list[float] = []
    bare_loop(spec, "bench-overhead", lambda *_: ends.append(time.perf_counter()))
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
