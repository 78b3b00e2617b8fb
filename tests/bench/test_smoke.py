"""Smoke run of every benchmark at its smallest size: structure only, never speed.

Each benchmark runs once (`--smoke`), in suite order, in this one process, so the
expensive runs the Ray benchmarks share (tests/bench/shared.py) start once.
Asserts: the rows each benchmark promises exist, every figure is a positive finite
number, the JSON the runner prints has exactly the documented keys, and ratio =
ours / baseline.
"""
from __future__ import annotations

import json
import math

import pytest

from tests.bench import __main__ as runner
from tests.bench.core import REGISTRY
from tests.bench.suite import ORDER, load_all

pytestmark = pytest.mark.bench

load_all()

ROWS = {
    "checkpoint_stall": {"checkpoint_stall", "checkpoint_stall_throughput"},
    "monitoring_overhead": {"monitoring_overhead"},
    "train_throughput": {"train_throughput"},  # the HF row runs at full size only
    "supervisor_scale": {"supervisor_scale", "supervisor_scale_ranks", "supervisor_scale_memory"},
    "api_latency": {"api_latency", "api_latency_runs_p99", "api_latency_control_p50", "api_latency_control_p99"},
    "recovery_loss_spike": {"recovery_loss_spike", "recovery_loss_spike_budget"},
    "recovery_worker_crash": {"recovery_worker_crash"},
    "recovery_node_loss": set(),  # full size only: no row at smoke size (see b_node_loss.py)
    "detection_latency": {"detection_latency"},  # the Prometheus row runs at full size only
    "detection_quality": {f"detection_quality_{k}" for k in ("loss_spike", "grad_explosion", "nan", "divergence",
                                                              "instability", "val_divergence")},
    "goodput": {"goodput"},
    "quiet_healthy": {"quiet_healthy"},
}


def test_every_benchmark_is_registered_and_covered():
    assert set(ORDER) == set(REGISTRY) == set(ROWS)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ORDER)
def test_smoke(name, capsys):
    results = runner.run([name], smoke=True)
    assert set(results) >= ROWS[name], f"{name}: rows {sorted(results)}"
    for row, r in results.items():
        for key in ("ours", "baseline", "ratio"):
            v = r[key]
            assert isinstance(v, float) and math.isfinite(v) and v > 0, f"{row}.{key} = {v!r}"
        assert r["ratio"] == pytest.approx(r["ours"] / r["baseline"])
        assert r["unit"] and r["baseline_name"] and r["runs"] == 1
    payload = {k: {j: r[j] for j in runner.JSON_KEYS} for k, r in results.items()}
    assert json.loads(json.dumps(payload)) == payload
    assert all(set(v) == set(runner.JSON_KEYS) for v in payload.values())
    assert runner.table(results).count("\n") >= len(results) + 1
    if name == "train_throughput":  # the bare loop does the guarded loop's arithmetic, bit for bit
        assert results["train_throughput"]["extra"]["max_loss_diff"] == 0.0


def test_cli_json_output_is_exactly_the_documented_object(capsys):
    """`python -m tests.bench --json --smoke NAME` prints one JSON object on stdout, progress on stderr."""
    assert runner.main(["--json", "--smoke", "checkpoint_stall"]) == 0
    out = capsys.readouterr()
    data = json.loads(out.out)
    assert set(data) == {"checkpoint_stall", "checkpoint_stall_throughput"}
    for v in data.values():
        assert set(v) == {"ours", "baseline", "unit", "ratio", "baseline_name", "runs"}
    assert "[bench" in out.err
