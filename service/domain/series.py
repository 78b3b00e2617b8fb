"""Metric samples and step-aligned windows, the input of every detector.

A series is one metric of one (run, stage, rank). Its samples are ordered by
training step, not by time: a window built from Prometheus scrapes is sparse
(several steps between samples), one built from the workers' /history is dense.
Detectors count *samples*, so both work; they never assume consecutive steps.

`RecordBuffer` is the watch's per-rank buffer of per-step records (a bounded deque): it
keeps, beside the records, each metric's samples (`KeySeries`, built once as records
arrive and trimmed with them) and what detectors track over them incrementally
(`Tracker`s, such as rolling medians), so a watch cycle does not rebuild them.
"""
from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol, SupportsIndex, TypeVar, Union, cast, overload

__all__ = ["Sample", "SampleLike", "Window", "as_samples", "asof", "RecordBuffer", "KeySeries", "Tracker"]


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
    if isinstance(xs, list) and _strictly_increasing(xs):
        return list(xs)  # already Samples in step order, one per step (the usual input): as they are
    by_step: dict[int, Sample] = {}
    for x in xs:
        s = _to_sample(x)
        by_step[s.step] = s
    return [by_step[k] for k in sorted(by_step)]


def _strictly_increasing(xs: list[Any]) -> bool:
    prev = None
    for x in xs:
        if type(x) is not Sample or (prev is not None and not prev < x.step):
            return False
        prev = x.step
    return True


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


# --------------------------------------------------------------------------- the watch's buffers


class Tracker(Protocol):
    """Something a detector keeps up to date over one KeySeries' values: it sees every value
    appended (oldest first) and every value dropped from the front; any other change discards
    it (it is rebuilt from the values the next time it is asked for)."""

    def append(self, v: float) -> None: ...

    def popleft(self, v: float) -> None: ...


T = TypeVar("T", bound=Tracker)


class KeySeries:
    """One metric's samples in a RecordBuffer, oldest first: exactly what reading `key` from
    each of its records gives (evaluate.py `_samples`: absent, None and non-numbers skipped), kept in step with the records. Held as
    plain steps, values and times (no Sample objects: a garbage collector's full pass over a
    thousand runs' buffers would visit each one); `samples()` makes the Samples."""

    __slots__ = ("key", "steps", "values", "times", "_index", "nonfinite", "_errors", "_trackers")

    def __init__(self, key: str) -> None:
        self.key = key
        self.steps: deque[int] = deque()
        self.values: deque[float] = deque()
        self.times: deque[float] = deque()
        self._index: deque[int] = deque()  # the buffer position (absolute) of each sample's record
        self.nonfinite = 0  # samples whose value is nan or +-inf
        self._errors: deque[int] = deque()  # positions of records whose value could not be read
        self._trackers: dict[Hashable, Tracker] = {}

    def __len__(self) -> int:
        return len(self.values)

    def samples(self, start: int = 0) -> list[Sample]:
        """The samples (from the `start`-th on), oldest first."""
        it = zip(self.steps, self.values, self.times)
        return [Sample(s, v, t) for s, v, t in (islice(it, start, None) if start else it)]

    def iter_samples(self) -> Iterator[Sample]:
        """The samples, made as they are read (for a detector that may not read them)."""
        return (Sample(s, v, t) for s, v, t in zip(self.steps, self.values, self.times))

    @property
    def usable(self) -> bool:
        """False while a record's value raised something reading it as a number does not (the
        watch then reads the records as before, and meets the same error)."""
        return not self._errors

    def tracker(self, name: Hashable, factory: Callable[[], T]) -> T:
        """The tracker kept under `name`, made by `factory` and fed the values held now the
        first time it is asked for."""
        t = self._trackers.get(name)
        if t is None:
            t = factory()
            for v in self.values:
                t.append(v)
            self._trackers[name] = t
        return cast(T, t)

    def _add(self, rec: Any, at: int) -> None:
        v = rec.get(self.key)
        if v is None:
            return
        try:
            step, value, when = int(rec["step"]), float(v), float(rec.get("time") or 0.0)
        except (TypeError, ValueError):
            return
        except Exception:  # noqa: BLE001 - read again (and raised) where the buffer is read as records
            self._errors.append(at)
            return
        self.steps.append(step)
        self.values.append(value)
        self.times.append(when)
        self._index.append(at)
        if not math.isfinite(value):
            self.nonfinite += 1
        for t in self._trackers.values():
            t.append(value)

    def _drop(self, at: int, *, last: bool) -> float | None:
        """Forget the record at buffer position `at`, the first (or `last`) one held: its
        sample's value, or None when it gave none."""
        end = -1 if last else 0
        if self._errors and self._errors[end] == at:
            (self._errors.pop if last else self._errors.popleft)()
        if not (self._index and self._index[end] == at):
            return None
        for d in (self._index, self.steps, self.times):
            (d.pop if last else d.popleft)()
        v = self.values.pop() if last else self.values.popleft()
        if not math.isfinite(v):
            self.nonfinite -= 1
        return v

    def _drop_first(self, at: int) -> None:
        v = self._drop(at, last=False)
        if v is not None:
            for t in self._trackers.values():
                t.popleft(v)

    def _drop_last(self, at: int) -> None:
        if self._drop(at, last=True) is not None:
            self._trackers.clear()  # they only go forward: rebuilt when next asked for


def _step_of(rec: Any) -> int | None:
    try:
        return int(rec["step"])
    except Exception:  # noqa: BLE001 - a record without a usable step: the buffer is read as records
        return None


class RecordBuffer(deque[dict[str, Any]]):
    """A rank's per-step records, oldest first, bounded by `maxlen` (a deque), that keeps each
    metric's samples beside them (`key_series`).

    Appending and dropping at either end (the bound's trimming, a rollback's `pop`) keep the
    samples in step as they go; any other change rebuilds them. `version` counts changes.
    `ordered` is True while every record has a step and the steps strictly increase (the
    watch's buffers always do): only then are the samples usable as a detector's sorted input.
    """

    def __init__(self, iterable: Iterable[dict[str, Any]] = (), maxlen: int | None = None) -> None:
        super().__init__((), maxlen)
        self.version = 0
        self._keys: dict[str, KeySeries] = {}
        self._first = 0  # absolute position of self[0]
        self._bad = 0  # records without a step or with an unhashable anomaly
        self._disorder = 0  # neighbours whose steps do not increase
        self._anomalies: dict[Any, int] = {}  # records per (truthy) "anomaly" value
        for rec in iterable:
            self.append(rec)

    # ---- what the watch reads --------------------------------------------------------------
    @property
    def ordered(self) -> bool:
        return not self._bad and not self._disorder

    def key_series(self, key: str) -> KeySeries:
        """`key`'s samples, kept from now on (built from the records held now the first time)."""
        ks = self._keys.get(key)
        if ks is None:
            ks = self._keys[key] = KeySeries(key)
            for i, rec in enumerate(self):
                ks._add(rec, self._first + i)
        return ks

    def has_anomaly(self, kinds: Iterable[Any]) -> bool:
        """Does a record carry one of these `anomaly` values?"""
        return any(self._anomalies.get(k) for k in kinds)

    # ---- bookkeeping -----------------------------------------------------------------------
    def _count(self, rec: Any, sign: int) -> None:
        try:
            kind = rec.get("anomaly")
            if kind:
                n = self._anomalies.get(kind, 0) + sign
                if n:
                    self._anomalies[kind] = n
                else:
                    del self._anomalies[kind]
            if _step_of(rec) is None:
                self._bad += sign
        except Exception:  # noqa: BLE001 - e.g. an unhashable anomaly value
            self._bad += sign

    def _pair(self, a: Any, b: Any) -> int:
        sa, sb = _step_of(a), _step_of(b)
        return int(sa is not None and sb is not None and sb <= sa)

    def _added_last(self, rec: dict[str, Any]) -> None:
        self.version += 1
        self._count(rec, 1)
        if len(self) > 1:
            self._disorder += self._pair(self[-2], rec)
        at = self._first + len(self) - 1
        for ks in self._keys.values():
            ks._add(rec, at)

    def _rebuild(self) -> None:
        """After a change other than at the ends: everything recounted from the records."""
        self.version += 1
        recs = list(self)
        self._first += len(recs) + 1  # fresh positions: nothing matches an old one
        self._bad = self._disorder = 0
        self._anomalies = {}
        for i, rec in enumerate(recs):
            self._count(rec, 1)
            if i:
                self._disorder += self._pair(recs[i - 1], rec)
        keys, self._keys = list(self._keys), {}
        for k in keys:
            self.key_series(k)

    # ---- deque's changes -------------------------------------------------------------------
    def append(self, rec: dict[str, Any]) -> None:
        if self.maxlen is not None and len(self) >= self.maxlen:
            if not self.maxlen:
                return
            self.popleft()  # what the bound would drop, with its bookkeeping
        super().append(rec)
        self._added_last(rec)

    def extend(self, recs: Iterable[dict[str, Any]]) -> None:
        for rec in list(recs):
            self.append(rec)

    def __iadd__(self, recs: Iterable[dict[str, Any]]) -> RecordBuffer:
        self.extend(recs)
        return self

    def popleft(self) -> dict[str, Any]:
        rec = super().popleft()
        self.version += 1
        at = self._first
        self._first += 1
        self._count(rec, -1)
        if self:
            self._disorder -= self._pair(rec, self[0])
        for ks in self._keys.values():
            ks._drop_first(at)
        return rec

    def pop(self) -> dict[str, Any]:  # type: ignore[override]  # deque.pop takes no index
        rec = super().pop()
        self.version += 1
        self._count(rec, -1)
        if self:
            self._disorder -= self._pair(self[-1], rec)
        at = self._first + len(self)
        for ks in self._keys.values():
            ks._drop_last(at)
        return rec

    def clear(self) -> None:
        super().clear()
        self._rebuild()

    def appendleft(self, rec: dict[str, Any]) -> None:
        super().appendleft(rec)
        self._rebuild()

    def extendleft(self, recs: Iterable[dict[str, Any]]) -> None:
        super().extendleft(recs)
        self._rebuild()

    def insert(self, i: int, rec: dict[str, Any]) -> None:
        super().insert(i, rec)
        self._rebuild()

    def remove(self, rec: dict[str, Any]) -> None:
        super().remove(rec)
        self._rebuild()

    def rotate(self, n: int = 1) -> None:
        super().rotate(n)
        self._rebuild()

    def reverse(self) -> None:
        super().reverse()
        self._rebuild()

    def __setitem__(self, i: SupportsIndex, rec: dict[str, Any]) -> None:  # type: ignore[override]
        super().__setitem__(i, rec)
        self._rebuild()

    def __delitem__(self, i: SupportsIndex) -> None:  # type: ignore[override]
        super().__delitem__(i)
        self._rebuild()

    def __imul__(self, n: int) -> RecordBuffer:
        super().__imul__(n)
        self._rebuild()
        return self

    def __copy__(self) -> RecordBuffer:
        return RecordBuffer(self, self.maxlen)

    def copy(self) -> RecordBuffer:
        return RecordBuffer(self, self.maxlen)

    def __reduce__(self) -> tuple[Any, ...]:
        return (RecordBuffer, (list(self), self.maxlen))
