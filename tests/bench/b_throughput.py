"""train_throughput: tokens/s of a guarded stage vs the same model and data in a bare loop.

Ours: the real `Harness` (workers/runtime/harness.py), one rank, in-process, as a worker
runs it: the exporter's HTTP server serving /metrics and /history while a scraper reads
both every 0.5 s from a process of its own (as the embedded supervisor does), the guard, the control inbox's
agreement at every step boundary, fault hooks, per-step metrics, history ring buffer and
JSONL log, and **checkpoints** (asynchronous writer, `every` steps, BLAKE3 manifest,
retention) — their stalls fall inside the timed window. Evaluation is pushed past the
measured steps (a bare loop has none to compare with); the stage's final evaluation and
final checkpoint, after the last step, are outside the window.

Baseline: plain torch on the same stage object type built from the same spec (same
initial weights, same batches): set the LR from the same schedule, zero_grad, forward
+ loss, `float(loss)` (every loop logs its loss), backward, clip_grad_norm_, AdamW step,
and at the same steps as ours a checkpoint as a plain script writes one: `torch.save` of the
model's and the optimizer's state dicts to a file, synchronously (a loop that never saves
is not the loop anyone runs).

Batch construction: **counted in both**. Both loops call the stage's `step()`, which
builds this rank's batch from the corpora (`data.batch`) before the forward; so both pay
exactly the same batch cost, and the two loops do the same arithmetic: the per-step
losses of the two loops are compared and their largest difference is reported as the
secondary figure `max_loss_diff` (0 when the work matches bit for bit).

Timing: the window is from the end of the last warm-up step to the end of the last step
(ends taken by `on_step` in ours, after the step's record is out; at the same point in
the bare loop), tokens = steps in the window x tokens per step. The two loops run in
alternating blocks (bare, ours, ours, bare, bare, ours, ...: BLOCKS pairs, each a fresh
stage of STEPS steps) so drift in the shared machine's load hits both; per repetition
the figure is tokens in all blocks / wall time in all blocks. Secondary figures:
`cpu_time_ratio` (the same ratio on process CPU time, all threads, which other load on a
shared machine disturbs far less than wall time), seconds per step of each loop.

Rows: `train_throughput` (built-in GPT, `medium`: 4 layers, d_model 256, seq 128; batch
8, one torch thread) and `train_throughput_hf` (a fresh Llama-architecture Hugging Face
model of the same width and depth, built from a config, with the run's trained BPE
tokenizer; full size only — smoke runs the GPT row at `tiny` size).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from tests.bench.core import Context, Measurement, benchmark
from tests.bench.shared import bare_loop, scraped
from tests.bench.workload import MODELS
from trainguard.workers.spec import PipelineSpec, parse_pipeline

RUN_ID = "bench-throughput"
# full size: per block 30 steps, the first 3 are warm-up; a checkpoint every 10 steps (two inside
# the timed window: more often than a real run checkpoints, so the figure bounds their cost)
STEPS, WARMUP, EVERY, BATCH, BLOCKS = 30, 3, 10, 8, 4
HF_LLAMA = {"architecture": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4}


def _spec(*, size: str, steps: int, batch_size: int, every: int, hf: bool = False) -> PipelineSpec:
    model: dict[str, Any] = dict(MODELS[size])
    if hf:
        model = {"seq_len": model["seq_len"], "hf": {"config": HF_LLAMA, "tokenizer_vocab_size": 1024}}
    stage = {"name": "pretrain", "kind": "pretrain", "steps": steps, "world_size": 1, "batch_size": batch_size,
             "lr": 3e-3, "warmup_steps": 5, "eval_every": 10_000_000, "eval_batches": 1}
    return parse_pipeline({"name": "bench-throughput", "seed": 11, "model": model,
                           "checkpoint": {"every": every, "keep_last": 2}, "stages": [stage]})


Window = tuple[float, float, int, list[float]]  # (wall s, process CPU s, tokens, per-step losses)


def _window(ends: list[tuple[float, float]], losses: list[float], tokens: int, warmup: int) -> Window:
    """Wall and CPU seconds, and tokens, from the end of step `warmup` to the end of the last step."""
    (w0, c0), (w1, c1) = ends[warmup - 1], ends[-1]
    return w1 - w0, c1 - c0, tokens * (len(ends) - warmup), losses


def _now() -> tuple[float, float]:
    # process CPU time counts every thread: ours' checkpoint writer and exporter threads too
    return time.perf_counter(), time.process_time()


def _ours(spec: PipelineSpec, state_dir: Path, checkpoint_root: Path, warmup: int) -> Window:
    from trainguard.workers.runtime.harness import Harness, make_context
    from trainguard.workers.stages import STAGES

    ctx = make_context(spec, "pretrain", run_id=RUN_ID, state_dir=state_dir)
    stage = STAGES["pretrain"](ctx)
    ends: list[tuple[float, float]] = []
    losses: list[float] = []

    def on_step(h: Harness) -> None:
        ends.append(_now())
        losses.append(h.last_loss)

    h = Harness(stage, spec=spec, stage_name="pretrain", run_id=RUN_ID, state_dir=state_dir,
                checkpoint_root=str(checkpoint_root), on_step=on_step)
    port = h.exporter.start("127.0.0.1")
    try:
        with scraped(port):
            res = h.run()
    finally:
        h.exporter.close()
    if res["state"] != "finished" or not h.reports:
        raise RuntimeError(f"guarded stage ended {res['state']!r} with {len(h.reports)} checkpoints")
    return _window(ends, losses, _tokens_per_step(spec), warmup)


def _bare(spec: PipelineSpec, state_dir: Path, warmup: int, checkpoint_dir: Path | None = None) -> Window:
    ends: list[tuple[float, float]] = []
    losses: list[float] = []
    tokens = [0]

    def on_step(step: int, loss: float, n: int) -> None:
        ends.append(_now())
        losses.append(loss)
        tokens[0] = n

    bare_loop(spec, RUN_ID, on_step, state_dir=state_dir, checkpoint_dir=checkpoint_dir)
    return _window(ends, losses, tokens[0], warmup)


def _measure(ctx: Context, spec: PipelineSpec, *, blocks: int, warmup: int, tag: str) -> tuple[float, float, dict]:
    """(ours tokens/s, bare tokens/s, secondary figures) over `blocks` alternating pairs."""
    wall = {"ours": 0.0, "bare": 0.0}
    cpu = {"ours": 0.0, "bare": 0.0}
    toks = {"ours": 0, "bare": 0}
    diff = 0.0
    # one state dir for both loops (the HF row's tokenizer is trained once, by the first
    # stage built, and read back by the others as a resumed worker would); each guarded
    # block writes its checkpoints to a folder of its own
    state = ctx.sub(f"throughput-{tag}")
    for b in range(blocks):
        for who in (("bare", "ours") if b % 2 == 0 else ("ours", "bare")):
            w, c, t, losses = (_bare(spec, state, warmup, state / f"bare-checkpoints-{b}") if who == "bare"
                               else _ours(spec, state, state / f"checkpoints-{b}", warmup))
            wall[who] += w
            cpu[who] += c
            toks[who] += t
            if who == "bare":
                bare_losses = losses
            else:
                ours_losses = losses
        diff = max(diff, max(abs(a - c) for a, c in zip(bare_losses, ours_losses)))
    o, r = toks["ours"] / wall["ours"], toks["bare"] / wall["bare"]
    extra = {"max_loss_diff": diff,
             "cpu_time_ratio": (toks["ours"] / cpu["ours"]) / (toks["bare"] / cpu["bare"]),
             "ours_s_per_step": wall["ours"] / (toks["ours"] / _tokens_per_step(spec)),
             "bare_s_per_step": wall["bare"] / (toks["bare"] / _tokens_per_step(spec))}
    return o, r, extra


def _tokens_per_step(spec: PipelineSpec) -> int:
    return spec.stage("pretrain").batch_size * spec.model.seq_len


@benchmark("train_throughput", reps=3, smoke_reps=1)
def train_throughput(ctx: Context) -> dict[str, Measurement]:
    """Tokens/s of a guarded stage (exporter, guard, checkpoints) vs a bare torch loop, same model and data."""
    torch.set_num_threads(1)
    if ctx.smoke:
        spec = _spec(size="tiny", steps=8, batch_size=8, every=4)
        warmup, blocks = 2, 1
    else:
        spec = _spec(size="medium", steps=STEPS, batch_size=BATCH, every=EVERY)
        warmup, blocks = WARMUP, BLOCKS
    o, b, extra = _measure(ctx, spec, blocks=blocks, warmup=warmup, tag="gpt")
    out = {"train_throughput": Measurement(o, b, "tokens/s", "bare torch loop (same model, same batches)",
                                           higher_is_better=True, extra=extra)}
    if not ctx.smoke:
        hspec = _spec(size="medium", steps=STEPS, batch_size=BATCH, every=EVERY, hf=True)
        o, b, extra = _measure(ctx, hspec, blocks=blocks, warmup=warmup, tag="hf")
        out["train_throughput_hf"] = Measurement(o, b, "tokens/s", "bare torch loop, HF Llama (same model, same batches)",
                                                 higher_is_better=True, extra=extra)
    return out
