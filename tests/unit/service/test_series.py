"""Samples and step-aligned windows."""
from __future__ import annotations

import pytest

from trainguard.service.domain.series import Sample, Window, as_samples, asof


def test_window_keeps_step_order_and_bound():
    w = Window(maxlen=3, samples=[(i, float(i)) for i in range(5)])
    assert [s.step for s in w] == [2, 3, 4] and w[-1] == Sample(4, 4.0) and len(w) == 3 and w[0].step == 2


def test_window_drops_discarded_history_after_rollback():
    w = Window(samples=[(i, 1.0) for i in range(10)])
    w.append(Sample(6, 2.0))  # the run went back to step 6
    assert [s.step for s in w] == [0, 1, 2, 3, 4, 5, 6] and w[-1].value == 2.0


def test_window_rejects_bad_maxlen():
    with pytest.raises(ValueError):
        Window(maxlen=0)


def test_as_samples_sorts_and_dedups():
    assert as_samples([(2, 1.0), (1, 5.0), (2, 3.0, 9.0)]) == [Sample(1, 5.0), Sample(2, 3.0, 9.0)]


def test_asof_is_the_last_sample_at_or_before_the_step():
    xs = as_samples([(0, 1.0), (10, 2.0)])
    assert asof(xs, 9).value == 1.0 and asof(xs, 10).value == 2.0 and asof(xs, -1) is None
