"""Benchmark plumbing: the registry, one measurement, aggregation, shared helpers.

A benchmark is a function `fn(ctx) -> {row_name: Measurement}` registered with
`@benchmark(name, reps=..., smoke_reps=...)`. The runner (tests/bench/__main__.py)
calls it `reps` times and aggregates each row over the repetitions: ours and
baseline are medians, ratio = median(ours) / median(baseline), min/max are ours'.
Every row compares against a baseline measured in the same repetition, on the same
machine, because the machine is shared and noisy.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = [
    "Measurement", "Context", "Benchmark", "REGISTRY", "benchmark", "aggregate", "log", "free_port",
    "wait_until", "ensure_ray", "read_jsonl", "timeline", "step_records", "percentile",
]


@dataclass
class Measurement:
    ours: float
    baseline: float
    unit: str
    baseline_name: str
    higher_is_better: bool = False  # ratio reading: times (lower better) vs throughputs/goodput
    extra: dict[str, float] = field(default_factory=dict)  # secondary figures (shown, not in --json)


@dataclass
class Context:
    smoke: bool
    workdir: Path
    rep: int = 0

    def sub(self, name: str) -> Path:
        p = self.workdir / f"{name}-rep{self.rep}"
        p.mkdir(parents=True, exist_ok=True)
        return p


@dataclass
class Benchmark:
    name: str
    fn: Callable[[Context], dict[str, Measurement]]
    reps: int
    smoke_reps: int
    uses_ray: bool
    doc: str


REGISTRY: dict[str, Benchmark] = {}


def benchmark(name: str, *, reps: int = 3, smoke_reps: int = 1, uses_ray: bool = False):
    def deco(fn: Callable[[Context], dict[str, Measurement]]):
        REGISTRY[name] = Benchmark(name, fn, reps, smoke_reps, uses_ray, (fn.__doc__ or "").strip())
        return fn

    return deco


def log(msg: str) -> None:
    """Progress goes to stderr: stdout is the table or the JSON."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def aggregate(name: str, ms: list[Measurement]) -> dict[str, Any]:
    ours = [m.ours for m in ms]
    base = [m.baseline for m in ms]
    o, b = statistics.median(ours), statistics.median(base)
    extras: dict[str, float] = {}
    for k in ms[0].extra:
        vals = [m.extra[k] for m in ms if k in m.extra and isinstance(m.extra[k], (int, float))]
        if vals:
            extras[k] = statistics.median(vals)
    return {
        "ours": float(o), "baseline": float(b), "unit": ms[0].unit,
        "ratio": float(o / b) if b else float("inf"), "baseline_name": ms[0].baseline_name,
        "runs": len(ms), "min": float(min(ours)), "max": float(max(ours)),
        "baseline_min": float(min(base)), "baseline_max": float(max(base)),
        "higher_is_better": ms[0].higher_is_better, "extra": extras,
    }


# -- helpers shared by the benchmarks ---------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll `cond` until truthy (a deadline, never a bare sleep)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - keep polling; report the last error on timeout
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last!r})" if last else ""))


def ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONHASHSEED": "0", "RAY_USAGE_STATS_ENABLED": "0"}})


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written right now
    return out


def step_records(records: list[dict]) -> list[dict]:
    """Per-step training records (eval records dropped)."""
    return [r for r in records if not r.get("eval") and "step_seconds" in r]


def timeline(records: list[dict]) -> list[dict]:
    """The steps that count in the end: when the step counter goes back (rollback, restart
    from a checkpoint), what was trained after that point is dropped."""
    out: list[dict] = []
    for r in step_records(records):
        while out and int(out[-1]["step"]) >= int(r["step"]):
            out.pop()
        out.append(r)
    return out


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@contextlib.contextmanager
def workdir(keep: bool = False) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="trainguard-bench-"))
    try:
        yield d
    finally:
        if not keep:
            import shutil

            shutil.rmtree(d, ignore_errors=True)
