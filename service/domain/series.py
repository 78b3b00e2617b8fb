"""Metric samples and step-aligned windows, the input of every detector.

A series is one metric of one (run, stage, rank). Its samples are ordered by
training step, not by time: a window built from Prometheus scrapes is sparse
(several steps between samples), one built from the workers' /history is dense.
Detectors count *samples*, so both work; they never assume consecutive steps.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union, overload

__all__ = ["Sample", "SampleLike", "Window", "as_samples", "asof"]


@dataclass(frozen=True, slots=True)
class Sample:
    """One observation: the metric's `value` after optimizer step `step`, seen at unix `time`."""

    step: int
    value: float
    time: float = 0.0


# A (step, value) or (step, value, time) tuple is accepted wherever a Sample is.
SampleLike = Union[Sample, tuple[Any, ...]]


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

    __slots__ = ("maxlen", "_samples")

    def __init__(self, *, maxlen: int = 2048, samples: Iterable[SampleLike] = ()) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen must be positive, got {maxlen}")
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

    @overload
    def __getitem__(self, i: int) -> Sample: ...

    @overload
    def __getitem__(self, i: slice) -> list[Sample]: ...

    def __getitem__(self, i: int | slice) -> Sample | list[Sample]:
        return self._samples[i]

    def __len__(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def __repr__(self) -> str:
        return f"Window(n={len(self._samples)}, maxlen={self.maxlen})"


def asof(samples: Sequence[Sample], step: int) -> Sample | None:
    """The last sample at or before `step` (samples sorted by step), or None."""
    i = bisect.bisect_right([s.step for s in samples], step)
    return samples[i - 1] if i else None
