"""supervisor_scale: one watch cycle (fetch -> ingest -> detectors -> incidents/decisions in the store)
over 1,000 concurrent simulated runs, against the same cycle over 10 runs scaled x100.

The cycle is the real `Controller.watch_once` on a real SQLite store; only the edges are
simulated: a `SimulatedSource` stands in for the workers' endpoints (each run's rank 0
returns the 10 steps it trained since the last cycle — 20 steps/s at the 0.5 s watch
interval — with loss, grad norm, LR, spike score, step time, and a val loss every 25
steps), and each run's worker group is a stub that accepts control messages. Every run
has a full 400-step buffer before the timed (steady-state) cycle. A further cycle in which
1% of the runs spike (incidents recorded, the policy's decisions carried out) is reported
as `cycle_with_1pct_spiking_s`.
Row `supervisor_scale_ranks`: the same steady-state cycle for one run of 1,024 ranks (each rank
returns its 10 new steps: loss, grad norm, LR, step and compute time), against 16 ranks x64;
the issue's target is <= 1 s per cycle (`target_s`).
Time: wall time of the steady-state cycle, without tracemalloc. Peak memory:
tracemalloc's peak during a second, identical cycle, above what was allocated before it.
The ingest buffers (400 steps per rank) are reported separately as `buffers_mb`
(at full size measured on the 10-run store and scaled: tracing the 1,000-run fill
costs minutes).
"""
from __future__ import annotations

import math
import random
import time
import tracemalloc

from tests.bench.core import Context, Measurement, benchmark, log

NEW_STEPS = 10
RANKS_TARGET_S = 1.0  # issue 13: a cycle over one run of 1,024 ranks


class StubGroup:
    """A worker group that accepts everything (no Ray)."""

    def control(self, kind, payload=None, timeout: float = 10.0) -> int:
        return 1

    def endpoints(self, timeout: float = 0) -> list[dict]:
        return []

    def poll(self, timeout: float = 0) -> dict:
        return {"state": "running", "ranks": [], "output_checkpoint": None, "failed_rank": None, "error": None}

    def shutdown(self) -> None:
        pass


class SimulatedSource:
    def __init__(self, spiking: set[str], *, compute_time: bool = False) -> None:
        self.step: dict[tuple[str, int], int] = {}
        self.spiking = spiking
        self.spike_now = False
        self.compute_time = compute_time  # rank 0 reports its compute time too (multi-rank runs)

    def fetch(self, targets):
        from trainguard.service.adapters.metrics import Snapshot

        out = {}
        now = time.time()
        for t in targets:
            at = (t.run, t.rank)
            s0 = self.step.get(at, 0)
            n = 390 if s0 == 0 else NEW_STEPS
            rng = random.Random(hash((t.run, s0)) if t.rank == 0 else hash((t.run, t.rank, s0)))
            recs = []
            for i in range(n):
                step = s0 + i + 1
                loss = 4.0 * math.exp(-step / 400) + 1.5 + rng.gauss(0, 0.02)
                if self.spike_now and t.run in self.spiking and i >= NEW_STEPS - 4:
                    loss *= 4.0
                rec = {"step": step, "seq": step, "batch_index": step - 1, "time": now - (n - i) * 0.05,
                       "loss": loss, "grad_norm": 0.8 + rng.gauss(0, 0.05), "lr": 1e-3, "spike_score": 0.1,
                       "anomaly": None, "step_seconds": 0.05 + rng.gauss(0, 0.002), "rank": t.rank}
                if t.rank > 0 or self.compute_time:
                    rec["compute_seconds"] = 0.04 + rng.gauss(0, 0.002)
                if step % 25 == 0 and t.rank == 0:
                    rec["val_loss"] = loss + 0.1
                recs.append(rec)
            self.step[at] = s0 + n
            anomalies = 4.0 if self.spike_now and t.run in self.spiking else 0.0
            out[t] = Snapshot(reachable=True, records=recs, counters={"anomalies:loss_spike": anomalies},
                              last_step_time=now, step=s0 + n, paused=False)
        return out

    def forget(self, target) -> None:
        pass

    def close(self) -> None:
        pass


def _setup(ctx: Context, n: int, tag: str, ranks: int = 1):
    from trainguard.service.adapters.metrics import Target
    from trainguard.service.config import Settings
    from trainguard.service.controller import Controller
    from trainguard.service.domain.state import RunState
    from trainguard.service.supervisor.driver import RunDriver
    from trainguard.service.supervisor.stage import ActiveStage
    from tests.bench.workload import pipeline
    import trainguard.workers.runtime.checkpoint  # noqa: F401 - a one-time import (torch), not a cost of the cycle

    state = ctx.sub(f"scale-{tag}")
    settings = Settings(state_dir=state, environment="development")
    src = SimulatedSource(set(), compute_time=ranks > 1)
    ctl = Controller(settings, source=src)
    spec = pipeline(name="sim", size="tiny", steps=100_000, world_size=1)
    ids = [ctl.ledger.create_run(name=f"sim-{i}", spec_json=spec.model_dump_json(), actor="bench") for i in range(n)]
    src.spiking.update(ids[i] for i in range(n) if i % 100 == 0)  # 1% (at least one run)
    for run_id in ids:
        ctl.ledger.set_state(run_id, RunState.RUNNING, actor="bench", reason="simulated")
        d = RunDriver(ctl.parts, run_id, spec)
        a = ActiveStage(run_id=run_id, name="pretrain", kind="pretrain", index=0, steps=100_000, group=StubGroup())
        a.targets = [Target(run=run_id, stage="pretrain", rank=r, host="127.0.0.1", port=1 + r) for r in range(ranks)]
        d.active = a
        ctl.drivers[run_id] = d
    return ctl, src


def _cycle(ctx: Context, n: int, tag: str, *, trace_fill: bool) -> dict[str, float]:
    from trainguard.service.db import crud

    ctl, src = _setup(ctx, n, tag)
    out: dict[str, float] = {}
    if trace_fill:
        tracemalloc.start()
    ctl.watch_once()  # fills every run's 400-step buffer (not timed)
    if trace_fill:
        out["buffers_mb"] = tracemalloc.get_traced_memory()[0] / 1e6
        tracemalloc.stop()  # tracemalloc slows Python down several-fold: timed cycles run without it
    # the steady-state cycle: 10 new steps per run, nothing wrong
    t0 = time.process_time()
    w0 = time.perf_counter()
    ctl.watch_once()
    out["wall"] = time.perf_counter() - w0
    out["cpu"] = time.process_time() - t0
    # the same cycle again under tracemalloc: its peak above what was allocated before it
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    ctl.watch_once()
    out["peak_mb"] = (tracemalloc.get_traced_memory()[1] - base) / 1e6
    tracemalloc.stop()
    # a cycle in which 1% of the runs spike: incidents, decisions, store writes
    src.spike_now = True
    w0 = time.perf_counter()
    ctl.watch_once()
    out["spike_wall"] = time.perf_counter() - w0
    with ctl.session() as s:
        out["incidents"] = sum(len(crud.list_incidents(s, run_id=r)) for r in list(ctl.drivers))
    ctl.engine.dispose()
    return out


def _ranks_cycle(ctx: Context, ranks: int, tag: str) -> dict[str, float]:
    """The steady-state cycle of one run of `ranks` ranks (a full 400-step buffer per rank)."""
    ctl, _ = _setup(ctx, 1, tag, ranks=ranks)
    ctl.watch_once()  # fills every rank's buffer (not timed)
    t0 = time.process_time()
    w0 = time.perf_counter()
    ctl.watch_once()
    out = {"wall": time.perf_counter() - w0, "cpu": time.process_time() - t0}
    ctl.engine.dispose()
    return out


@benchmark("supervisor_scale", reps=2, smoke_reps=1)
def supervisor_scale(ctx: Context) -> dict[str, Measurement]:
    """One watch cycle over 1,000 simulated runs vs 10 runs x100; peak memory (tracemalloc)."""
    n, small = (40, 4) if ctx.smoke else (1000, 10)
    scale = n // small
    big = _cycle(ctx, n, "big", trace_fill=ctx.smoke)
    little = _cycle(ctx, small, "small", trace_fill=True)
    buffers = big.get("buffers_mb", little["buffers_mb"] * scale)
    ranks, few = (64, 8) if ctx.smoke else (1024, 16)
    wide = _ranks_cycle(ctx, ranks, "ranks")
    narrow = _ranks_cycle(ctx, few, "few-ranks")
    log(f"  one run of {ranks} ranks: {wide['wall']:.3f}s wall ({wide['cpu']:.3f}s CPU); {few} ranks: "
        f"{narrow['wall']:.4f}s")
    log(f"  {n} runs: {big['wall']:.3f}s wall ({big['cpu']:.3f}s CPU), peak {big['peak_mb']:.1f} MB in the cycle, "
        f"~{buffers:.0f} MB buffers; with 1% spiking {big['spike_wall']:.3f}s, {big['incidents']:.0f} incidents; "
        f"{small} runs: {little['wall']:.4f}s")
    return {
        "supervisor_scale": Measurement(big["wall"], little["wall"] * scale, "s/cycle", f"{small} runs x{scale}",
                                        extra={"cpu_s": big["cpu"], "cycle_with_1pct_spiking_s": big["spike_wall"],
                                               "incidents": big["incidents"]}),
        "supervisor_scale_ranks": Measurement(wide["wall"], narrow["wall"] * (ranks // few), "s/cycle",
                                              f"{few} ranks x{ranks // few}",
                                              extra={"cpu_s": wide["cpu"], "ranks": ranks, "target_s": RANKS_TARGET_S}),
        "supervisor_scale_memory": Measurement(big["peak_mb"], little["peak_mb"] * scale, "MB",
                                               f"{small} runs x{scale} (peak)", extra={"buffers_mb": buffers}),
    }
