"""Metric samples and step-aligned windows, the input of every detector.

A series is one metric of one (run, stage, rank). Its samples are ordered by
training step, not by time: a window built from Prometheus scrapes is sparse
(several steps between samples), one built from the workers' /history is dense.
Detectors count *samples*, so both work; they never assume consecutive steps.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

__all__ = [
    "Sample",
    "SeriesKey",
    "Window",
    "SampleLike",
    "as_samples",
    "merge",
    "align",
    "align_many",
    "asof",
    "finite",
]


@dataclass(frozen=True, slots=True)
class Sample:
    """One observation: the metric's `value` after optimizer step `step`, seen at unix `time`."""

    step: int
    value: float
    time: float = 0.0


# A (step, value) or (step, value, time) tuple is accepted wherever a Sample is.
SampleLike = Union[Sample, tuple]


@dataclass(frozen=True, slots=True)
class SeriesKey:
    """Identity of a series. `rank=None` is a run-level series (e.g. rank 0's loss for the group)."""

    run: str
    stage: str
    rank: int | None
    metric: str


def _to_sample(x: SampleLike) -> Sample:
    if isinstance(x, Sample):
        return x
    if len(x) == 2:
        return Sample(int(x[0]), float(x[1]))
    return Sample(int(x[0]), float(x[1]), float(x[2]))


def as_samples(xs: Iterable[SampleLike]) -> list[Sample]:
    """Samples sorted by step, one per step (the last one given wins)."""
    by_step: dict[int, Sample] = {}
    for x in xs:
        s = _to_sample(x)
        by_step[s.step] = s
    return [by_step[k] for k in sorted(by_step)]


class Window(Sequence[Sample]):
    """A bounded, step-ordered window of one series.

    Appending a sample whose step is not after the last one means the run was
    rolled back or restarted: the samples from that step on belong to discarded
    history and are dropped before the new one is kept.
    """

    __slots__ = ("key", "maxlen", "_samples")

    def __init__(self, key: SeriesKey | None = None, maxlen: int = 2048, samples: Iterable[SampleLike] = ()) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen must be positive, got {maxlen}")
        self.key = key
        self.maxlen = maxlen
        self._samples: list[Sample] = []
        self.extend(samples)

    def append(self, sample: SampleLike) -> None:
        s = _to_sample(sample)
        if self._samples and s.step <= self._samples[-1].step:
            cut = bisect.bisect_left([x.step for x in self._samples], s.step)
            del self._samples[cut:]
        self._samples.append(s)
        if len(self._samples) > self.maxlen:
            del self._samples[: len(self._samples) - self.maxlen]

    def extend(self, samples: Iterable[SampleLike]) -> None:
        for s in samples:
            self.append(s)

    def since(self, step: int) -> list[Sample]:
        """Samples with step > `step`."""
        i = bisect.bisect_right([x.step for x in self._samples], step)
        return self._samples[i:]

    def last(self) -> Sample | None:
        return self._samples[-1] if self._samples else None

    def steps(self) -> list[int]:
        return [s.step for s in self._samples]

    def values(self) -> list[float]:
        return [s.value for s in self._samples]

    def pairs(self) -> list[tuple[int, float]]:
        return [(s.step, s.value) for s in self._samples]

    def __getitem__(self, i):  # type: ignore[override]
        return self._samples[i]

    def __len__(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def __repr__(self) -> str:
        return f"Window(key={self.key!r}, n={len(self._samples)})"


def merge(*series: Iterable[SampleLike]) -> list[Sample]:
    """One series from several partial views of the same metric (e.g. /history and
    scrapes), sorted by step; where two give the same step the later argument wins."""
    out: dict[int, Sample] = {}
    for xs in series:
        for x in xs:
            s = _to_sample(x)
            out[s.step] = s
    return [out[k] for k in sorted(out)]


def asof(samples: Sequence[Sample], step: int) -> Sample | None:
    """The last sample at or before `step` (samples sorted by step), or None."""
    i = bisect.bisect_right([s.step for s in samples], step)
    return samples[i - 1] if i else None


def align(a: Iterable[SampleLike], b: Iterable[SampleLike], how: str = "inner") -> list[tuple[int, float, float]]:
    """(step, a_value, b_value) rows.

    how="inner": steps present in both. how="asof": every step of `a`, with the
    last `b` value at or before it (rows before `b`'s first sample are dropped) —
    the join for a sparse series (val loss every N steps) against a dense one.
    """
    sa, sb = as_samples(a), as_samples(b)
    if how == "inner":
        bv = {s.step: s.value for s in sb}
        return [(s.step, s.value, bv[s.step]) for s in sa if s.step in bv]
    if how == "asof":
        steps_b = [s.step for s in sb]
        rows = []
        for s in sa:
            i = bisect.bisect_right(steps_b, s.step)
            if i:
                rows.append((s.step, s.value, sb[i - 1].value))
        return rows
    raise ValueError(f"how must be 'inner' or 'asof', got {how!r}")


def align_many(series: Mapping[str, Iterable[SampleLike]]) -> list[tuple[int, dict[str, float]]]:
    """Outer join by step: (step, {metric: value}) for every step any series has;
    a metric missing at a step is absent from that row's dict (NaN is kept as a value)."""
    rows: dict[int, dict[str, float]] = {}
    for name, xs in series.items():
        for x in xs:
            s = _to_sample(x)
            rows.setdefault(s.step, {})[name] = s.value
    return [(k, rows[k]) for k in sorted(rows)]


def finite(samples: Iterable[Sample]) -> list[Sample]:
    """The samples whose value is finite."""
    return [s for s in samples if math.isfinite(s.value)]
