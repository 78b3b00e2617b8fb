"""What every detector shares: the incident kinds, the `Finding` it returns, and the
robust statistics (rolling median/MAD, counter increases) the scans are built from."""
from __future__ import annotations

import bisect
import enum
import math
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import islice
from dataclasses import dataclass, field
from typing import Any

from trainguard.service.domain.series import Sample, SampleLike, Window, as_samples

__all__ = [
    "IncidentKind",
    "Finding",
    "MAD_TO_SIGMA",
    "RollingMedian",
    "MedianTrack",
    "counter_increases",
    "evidence_window",
    "json_value",
    "sorted_samples",
]

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


class IncidentKind(str, enum.Enum):
    """Incident kinds; the string values are used in the store, metrics labels and the API."""

    LOSS_SPIKE = "loss_spike"
    DIVERGENCE = "divergence"
    NAN = "nan"
    GRAD_EXPLOSION = "grad_explosion"
    VAL_DIVERGENCE = "val_divergence"
    REWARD_HACKING = "reward_hacking"
    DPO_COLLAPSE = "dpo_collapse"
    HANG = "hang"
    STRAGGLER = "straggler"
    WORKER_LOST = "worker_lost"
    GPU_FAULT = "gpu_fault"
    INSTABILITY = "instability"
    # PPO update health (detectors/post_training.py)
    POLICY_RATIO = "policy_ratio"
    NEGATIVE_KL = "negative_kl"
    ENTROPY_COLLAPSE = "entropy_collapse"
    RESPONSE_LENGTH = "response_length"
    VALUE_LOSS_EXPLOSION = "value_loss_explosion"
    NODE_LOST = "node_lost"
    INSUFFICIENT_RESOURCES = "insufficient_resources"


@dataclass(frozen=True, slots=True)
class Finding:
    """One detected episode. `kind` is an `IncidentKind` value (a plain str)."""

    kind: str
    onset_step: int
    detected_at_step: int
    evidence: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "onset_step": self.onset_step,
            "detected_at_step": self.detected_at_step,
            "evidence": self.evidence,
        }


def json_value(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)  # "nan" / "inf" / "-inf": JSON columns reject NaN


def evidence_window(samples: Sequence[Sample], lo: int, hi: int, cap: int = 64) -> list[list[Any]]:
    """Evidence window: [step, value] of samples[lo..hi] inclusive, the last `cap` of them."""
    lo = max(lo, hi + 1 - cap, 0)
    return [[s.step, json_value(s.value)] for s in samples[lo : hi + 1]]


def sorted_samples(xs: Iterable[SampleLike]) -> list[Sample]:
    """A detector's input as a list of Samples sorted by step (a Window already is one)."""
    return list(xs) if isinstance(xs, Window) else as_samples(xs)


def _median_sorted(xs: list[float]) -> float:
    n = len(xs)
    m = n // 2
    return xs[m] if n % 2 else 0.5 * (xs[m - 1] + xs[m])


class RollingMedian:
    """Median of the last `n` values pushed (a sorted list beside a FIFO)."""

    __slots__ = ("n", "fifo", "sorted")

    def __init__(self, n: int) -> None:
        self.n = n
        self.fifo: deque[float] = deque()
        self.sorted: list[float] = []

    def push(self, v: float) -> None:
        self.fifo.append(v)
        bisect.insort(self.sorted, v)
        if len(self.fifo) > self.n:
            old = self.fifo.popleft()
            del self.sorted[bisect.bisect_left(self.sorted, old)]

    def __len__(self) -> int:
        return len(self.fifo)

    def median(self) -> float:
        return _median_sorted(self.sorted)

    def mad(self, med: float) -> float:
        return _median_sorted(sorted(abs(v - med) for v in self.sorted))


class MedianTrack:
    """A `Tracker` (series.py) of a series' rolling median: for each finite sample, in order, the
    median of the last `n` finite values up to it (nan for the first n - 1 the track saw).

    A detector that scans a window with `RollingMedian(n)` from the window's first finite sample
    gets, at the window's i-th finite sample (i >= n - 1), the median of the same n values: the
    track's entry there, whatever the window's start. Entries before that are not the scan's."""

    __slots__ = ("roll", "medians")

    def __init__(self, n: int) -> None:
        self.roll = RollingMedian(n)
        self.medians: deque[float] = deque()  # one per finite sample held

    def append(self, v: float) -> None:
        if not math.isfinite(v):
            return
        roll = self.roll
        roll.push(v)
        self.medians.append(_median_sorted(roll.sorted) if len(roll.fifo) >= roll.n else math.nan)

    def popleft(self, v: float) -> None:
        if math.isfinite(v):
            self.medians.popleft()

    def full(self) -> list[float]:
        """The medians a scan of the held window computes over n values (finite index >= n - 1)."""
        return list(islice(self.medians, self.roll.n - 1, None))


def counter_increases(samples: Sequence[Sample]) -> list[tuple[int, int, float]]:
    """(index, onset_step, increase) for each sample where a counter rose. A drop is a reset
    (a restarted process): the new value is the increase, as in PromQL's increase()."""
    out = []
    for i in range(1, len(samples)):
        prev, cur = samples[i - 1].value, samples[i].value
        if not (math.isfinite(prev) and math.isfinite(cur)):
            continue
        inc = cur - prev if cur >= prev else cur
        if inc > 0:
            # the counted event happened somewhere in (prev.step, cur.step]: take the earliest
            out.append((i, samples[i - 1].step + 1, inc))
    return out
