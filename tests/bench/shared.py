"""Runs several benchmarks read: a supervised run under the real Controller, and the Ray Train run.

At smoke size recovery_worker_crash, detection_latency and goodput read the same supervised
run (a crash, then a spike), cached for the process, so the smoke suite starts it once. The
Ray Train baseline runs at full size only (it costs the smoke suite half a minute and the
smoke checks structure, not speed); at smoke size each of those rows takes its baseline from
the same supervised run (see each benchmark).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from datetime import timezone
from pathlib import Path
from typing import Any, Iterator

from tests.bench.core import Context, ensure_ray, log, read_jsonl
from tests.bench.workload import fired_time, metrics_log, pipeline, size_for

_CACHE: dict[Any, Any] = {}

# smoke: one supervised run, crash first, then a loss spike
SMOKE_STEPS = 60
SMOKE_CRASH = (15, 1)  # (batch index, rank)
# late enough that the restarted group has a full detector window (16 samples) of trained,
# settled loss before it: a corrupted batch on a barely trained model is not 1.5x its loss
SMOKE_SPIKE = 44


FAULT_KINDS = ("worker_crash", "hang", "loss_spike", "nan", "gpu_xid")


@dataclass
class SupervisedRun:
    """What the benchmarks read from a finished supervised run, read eagerly: the work
    directory of one runner invocation is deleted when it ends, a cached run outlives it."""

    state_dir: Path
    run_id: str
    state: str
    submitted: float
    ended: float
    incidents: list[Any]
    watch_interval: float
    records: list[dict] = field(default_factory=list)  # rank 0's per-step log
    fired_at: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def read(cls, state_dir: Path, run_id: str, state: str, submitted: float, ended: float, incidents: list[Any],
             watch_interval: float) -> "SupervisedRun":
        fired = {k: fired_time(state_dir / "runs" / run_id / "faults", k) for k in FAULT_KINDS}
        return cls(state_dir, run_id, state, submitted, ended, incidents, watch_interval,
                   read_jsonl(metrics_log(state_dir, run_id, 0)), fired)

    def log(self) -> list[dict]:
        return self.records

    def fired(self, kind: str) -> float | None:
        return self.fired_at.get(kind)


def ts(dt: Any) -> float:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


@contextlib.contextmanager
def controller(state_dir: Path, **overrides: Any) -> Iterator[Any]:
    """The real supervisor: Controller + APScheduler jobs, embedded scrape path unless prometheus_url."""
    from trainguard.service.config import Settings
    from trainguard.service.app import embedded_supervisor

    opts: dict[str, Any] = dict(state_dir=state_dir, environment="development", watch_interval=0.5,
                                hang_timeout=5.0)
    opts.update(overrides)
    ensure_ray()
    with embedded_supervisor(Settings(**opts)) as ctl:
        yield ctl


def supervised_run(ctx: Context, name: str, spec: Any, *, timeout: float = 600, **settings: Any) -> SupervisedRun:
    from trainguard.service.db import crud

    key = ("ours", name, spec.model_dump_json(), tuple(sorted(settings.items())))
    if ctx.smoke and key in _CACHE:
        return _CACHE[key]
    state = ctx.sub(name)
    with controller(state, **settings) as ctl:
        t0 = time.time()
        run_id = ctl.submit(spec, actor="bench")
        deadline = time.monotonic() + timeout
        st = "pending"
        while time.monotonic() < deadline:
            with ctl.session() as s:
                st = crud.get_run(s, run_id=run_id).state
            if st in ("completed", "failed", "stopped", "needs_attention"):
                break
            time.sleep(0.1)
        t1 = time.time()
        with ctl.session() as s:
            incs = crud.list_incidents(s, run_id=run_id)
        interval = float(ctl.settings.watch_interval)
    if st != "completed":
        raise RuntimeError(f"supervised run {name} ended {st!r} (incidents: {[(i.kind, i.action) for i in incs]})")
    res = SupervisedRun.read(state, run_id, st, t0, t1, incs, interval)
    if ctx.smoke:
        _CACHE[key] = res
    return res


def raytrain_run(ctx: Context, name: str, spec: Any, *, crashes: list[tuple[int, int]], every: int) -> dict:
    from tests.bench.raytrain import run_raytrain

    key = ("raytrain", name, spec.model_dump_json(), tuple(crashes), every)
    if ctx.smoke and key in _CACHE:
        return _CACHE[key]
    ensure_ray()
    res = run_raytrain(spec, ctx.sub(name), crashes=crashes, every=every, max_failures=len(crashes))
    res["records"] = read_jsonl(res["log"])
    res["kill"] = fired_time(res["fired_dir"], "worker_crash")  # read now: the work dir may go first
    if not res["records"]:
        raise RuntimeError(f"Ray Train run {name} trained no step (error: {res['error']!r}; "
                           f"work dir {ctx.sub(name)})")
    if res["error"] is not None:
        log(f"  Ray Train run {name} ended with an error: {res['error']!r}")
    if ctx.smoke:
        _CACHE[key] = res
    return res


def smoke_run(ctx: Context) -> SupervisedRun:
    """The shared smoke run (see the module docstring)."""
    at, rank = SMOKE_CRASH
    spec = pipeline(name="smoke", size=size_for(True), steps=SMOKE_STEPS, world_size=2, every=10,
                    faults=[{"kind": "worker_crash", "at_step": at, "rank": rank},
                            {"kind": "loss_spike", "at_step": SMOKE_SPIKE, "duration": 6}])
    log("  smoke: supervised run (crash, then a loss spike)")
    return supervised_run(ctx, "smoke-ours", spec)


def first_start_s(run: SupervisedRun) -> float:
    """Seconds from the run's submission to its first step completed: a worker group started
    from nothing (what Ray Train does again after every failure) — the smoke size's stand-in for
    the Ray Train run, which runs at full size only."""
    first = min(float(r["time"]) for r in run.log() if "step_seconds" in r)
    return first - run.submitted


# what a supervisor's scrape does, from its own process: /history since the last record it has,
# then /metrics, every `every_s` seconds
_SCRAPER = """
import json, sys, time, urllib.request
port, every, seq = int(sys.argv[1]), float(sys.argv[2]), -1
while True:
    time.sleep(every)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/history?since={seq}", timeout=2) as r:
            seq = max([seq, *(int(x["seq"]) for x in json.loads(r.read()))])
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
    except OSError:
        pass
"""


@contextlib.contextmanager
def scraped(port: int, every_s: float = 0.5) -> Iterator[None]:
    """A scraper reading a worker exporter's /history (the records since the last one it has,
    as the embedded supervisor's source does) and /metrics every `every_s` seconds while the
    body runs: the load a guarded step really has. It runs in a process of its own, as the
    supervisor does, so its client side is not counted as the worker's."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _SCRAPER, str(port), str(every_s)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)  # its interpreter started: its scrapes land in the body's steps
        yield
    finally:
        proc.kill()
        proc.wait()


class BareLoop:
    """The baseline training loop of the overhead benchmarks, one step at a time: plain torch on
    the pretrain stage of `spec` (same initial weights and batches as the guarded `Harness`): the
    LR from the same schedule, zero_grad, forward + loss, `float(loss)` (every loop logs its
    loss), backward, clip_grad_norm_, AdamW step."""

    def __init__(self, spec: Any, run_id: str, *, state_dir: Path | None = None) -> None:
        import torch

        from trainguard.workers.runtime.harness import make_context
        from trainguard.workers.stages import STAGES

        self.spec = spec
        self.s = s = spec.stage("pretrain")
        self.stage = STAGES["pretrain"](make_context(spec, "pretrain", run_id=run_id, state_dir=state_dir))
        self.params = [p for p in self.stage.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW([{"params": [p for p in self.params if p.dim() >= 2],
                                       "weight_decay": s.weight_decay},
                                      {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0}],
                                     lr=s.lr, betas=(0.9, 0.95))
        self.mixture = dict(s.mixture)

    def step(self, step: int) -> tuple[float, int]:
        """Train step `step`; returns (loss, tokens)."""
        import torch

        from trainguard.workers.runtime.harness import schedule_lr

        s = self.s
        lr = schedule_lr(step, base=s.lr, total=s.steps, warmup=s.warmup_steps, min_ratio=s.min_lr_ratio)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        result = self.stage.step(step, step, self.mixture)  # builds the batch, forward, loss
        loss = result.loss.float()
        value = float(loss.detach())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
        self.opt.step()
        return value, result.tokens


def bare_loop(spec: Any, run_id: str, on_step: Any, *, state_dir: Path | None = None,
              checkpoint_dir: Path | None = None) -> None:
    """`BareLoop` over every step of the pretrain stage; `on_step(step, loss, tokens)` after each.
    With `checkpoint_dir`, at the steps the harness checkpoints, a checkpoint as a plain script
    writes one: `torch.save` of the model's and optimizer's state dicts, synchronously."""
    import torch

    loop = BareLoop(spec, run_id, state_dir=state_dir)
    every = spec.checkpoint_for(loop.s).every
    for step in range(loop.s.steps):
        value, tokens = loop.step(step)
        done = step + 1
        if checkpoint_dir is not None and done % every == 0 and done < loop.s.steps:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"model": loop.stage.model.state_dict(), "optimizer": loop.opt.state_dict()},
                       checkpoint_dir / f"step-{done}.pt")
        on_step(step, value, tokens)
