"""Samples and step-aligned windows."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from trainguard.service.domain.series import Sample, SeriesKey, Window, align, align_many, as_samples, asof, merge


def test_window_keeps_step_order_and_bound():
    w = Window(SeriesKey("r", "pretrain", 0, "loss"), maxlen=3, samples=[(i, float(i)) for i in range(5)])
    assert w.steps() == [2, 3, 4] and w.last() == Sample(4, 4.0)
    assert w.since(2) == [Sample(3, 3.0), Sample(4, 4.0)]
    assert w.pairs() == [(2, 2.0), (3, 3.0), (4, 4.0)] and len(w) == 3 and w[0].step == 2


def test_window_drops_discarded_history_after_rollback():
    w = Window(samples=[(i, 1.0) for i in range(10)])
    w.append(Sample(6, 2.0))  # the run went back to step 6
    assert w.steps() == [0, 1, 2, 3, 4, 5, 6] and w.last().value == 2.0


def test_window_rejects_bad_maxlen():
    with pytest.raises(ValueError):
        Window(maxlen=0)


def test_as_samples_sorts_and_dedups():
    assert as_samples([(2, 1.0), (1, 5.0), (2, 3.0, 9.0)]) == [Sample(1, 5.0), Sample(2, 3.0, 9.0)]


def test_merge_later_series_wins():
    assert merge([(1, 1.0), (2, 1.0)], [(2, 7.0), (3, 1.0)]) == [Sample(1, 1.0), Sample(2, 7.0), Sample(3, 1.0)]


def test_align_inner_and_asof():
    train = [(s, float(s)) for s in range(0, 10)]
    val = [(0, 100.0), (5, 105.0)]
    assert align(val, train) == [(0, 100.0, 0.0), (5, 105.0, 5.0)]
    assert align(train, val, how="asof")[4:7] == [(4, 4.0, 100.0), (5, 5.0, 105.0), (6, 6.0, 105.0)]
    with pytest.raises(ValueError):
        align(train, val, how="outer")


def test_asof_and_align_many():
    xs = as_samples([(0, 1.0), (10, 2.0)])
    assert asof(xs, 9).value == 1.0 and asof(xs, -1) is None
    rows = align_many({"loss": [(0, 1.0), (1, math.nan)], "val": [(1, 2.0)]})
    assert rows[0] == (0, {"loss": 1.0}) and rows[1][0] == 1 and math.isnan(rows[1][1]["loss"])


def test_domain_imports_no_io_frameworks():
    code = (
        "import sys, trainguard.service.domain, trainguard.service.domain.detectors, trainguard.service.domain.policy, trainguard.service.domain.state;"
        "bad = [m for m in ('fastapi','ray','sqlmodel','httpx','torch','pydantic','numpy') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
