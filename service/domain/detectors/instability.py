"""Sustained instability: the loss keeps oscillating well above its running best while the
learning rate is high, without any single spike (a learning rate that is too high).

The rule, on the smoothed loss m (rolling median of `smooth` samples) and its running best b
(the lowest m seen, from `min_history` samples on):

1. *unsettled*: m stays above b * (1 + `settle`) (it never comes back near the best);
2. *well above*: for at least `window` unsettled samples, of which at least `min_fraction`
   have m >= b * (1 + `rise`);
3. *oscillating*: m reversed direction at least `min_swings` times within the episode by
   more than a noise-aware swing (`swing` of m, or `noise_k` x the noise of m measured on
   the settled history before the episode, whichever is larger);
4. *while the LR is high*: the LR at that sample is >= `lr_high` x the highest LR seen so far
   (not checked when no LR series is given).

Why each part: (1)+(2) make a healthy noisy curve (m hugs its running best) and a slow
plateau (m stays at its best) quiet; `min_history` keeps the noisy first steps out; (3) tells
an oscillation from a single smooth hump (the warmup bump of a healthy run, rising and
falling once) and from a monotone rise (the divergence detector's); (4) is what makes a
lower LR the remedy. A single spike moves a 25-sample median only when it lasts about half
of it, and then it rises and falls once: the spike detector's business, not this one's.

Cost: one pass, O(n log smooth) with the rolling medians; the supervisor calls it on the
buffered window (service/supervisor/stage.py BUFFER_STEPS = 400 steps), so the defaults
detect within `smooth`/2 + `window` samples of the onset (about 160-250 per-step samples).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from trainguard.service.domain.detectors.base import (
    MAD_TO_SIGMA,
    Finding,
    IncidentKind,
    RollingMedian,
    evidence_window,
    sorted_samples,
)
from trainguard.service.domain.series import Sample, SampleLike

__all__ = ["InstabilityConfig", "detect_instability", "instability_ruled_out"]

_MEDIAN_EFFICIENCY = 1.2533  # std of a sample median / (std of one sample / sqrt(n)), normal noise


@dataclass(frozen=True, slots=True, kw_only=True)
class InstabilityConfig:
    """Sustained instability: the smoothed loss oscillates well above its running best."""

    smooth: int = 25
    """Samples per rolling median (absorbs single outliers and short spikes)."""
    best_smooth: int = 100
    """Samples per rolling median the running best is taken from: longer than `smooth`, so the
    best is not the luckiest dip of a noisy median (the minimum of a noisy series is biased low)."""
    min_history: int = 100
    """Samples before the running best is taken: the noisy first steps never count."""
    rise: float = 0.10
    """m >= best + rise * |best| + `noise_rise` x the noise of m is 'well above' the best."""
    settle: float = 0.03
    """m back under best + settle * |best| + `noise_settle` x the noise of m ends an episode."""
    noise_rise: float = 3.0
    """Standard deviations of m's noise added to the `rise` threshold (a noisy curve needs more)."""
    noise_settle: float = 2.0
    """Standard deviations of m's noise added to the `settle` threshold."""
    min_abs_rise: float = 0.02
    """...and m - best must be at least this (loss units), so a loss near zero does not count."""
    recovery: int = 50
    """Consecutive settled samples that end an episode (an oscillation dips near the best and
    leaves again: one dip does not end it)."""
    window: int = 150
    """Unsettled samples an episode needs before it is an incident."""
    min_fraction: float = 0.6
    """Fraction of the episode's samples that must be well above the best."""
    min_swings: int = 2
    """Direction reversals of m within the episode: a peak and a trough (a single hump has one)."""
    swing: float = 0.05
    """Smallest reversal that counts, as a fraction of m..."""
    noise_k: float = 3.0
    """...or this many standard deviations of m's noise (measured before the episode), if larger."""
    lr_high: float = 0.5
    """The LR must be >= this x the highest LR seen so far (ignored without an LR series)."""
    context: int = 8
    """Samples before the onset kept in the evidence window."""

    def __post_init__(self) -> None:
        if self.smooth < 3 or self.best_smooth < self.smooth or self.min_history < self.best_smooth or self.window < 1:
            raise ValueError(f"need 3 <= smooth <= best_smooth <= min_history and window >= 1 (got {self.smooth}, "
                             f"{self.best_smooth}, {self.min_history}, {self.window})")
        if self.recovery < 1:
            raise ValueError("recovery must be >= 1")
        if self.noise_rise < 0 or self.noise_settle < 0:
            raise ValueError("noise_rise and noise_settle must be >= 0")
        if not 0 <= self.settle < self.rise:
            raise ValueError(f"need 0 <= settle ({self.settle}) < rise ({self.rise})")
        if not 0 < self.min_fraction <= 1 or self.min_swings < 0 or self.swing < 0 or self.noise_k < 0:
            raise ValueError("need 0 < min_fraction <= 1 and min_swings, swing, noise_k >= 0")
        if not 0 <= self.lr_high <= 1 or self.min_abs_rise < 0:
            raise ValueError("need 0 <= lr_high <= 1 and min_abs_rise >= 0")


class _LrTrack:
    """The LR in effect at a step (last sample at or before it) and the highest one seen up to it."""

    __slots__ = ("samples", "j", "peak", "now")

    def __init__(self, lr: Sequence[Sample]) -> None:
        self.samples = [s for s in lr if math.isfinite(s.value)]
        self.j = 0
        self.peak = 0.0
        self.now: float | None = None

    def advance(self, step: int) -> None:
        while self.j < len(self.samples) and self.samples[self.j].step <= step:
            self.now = self.samples[self.j].value
            self.peak = max(self.peak, self.now)
            self.j += 1

    def high(self, frac: float) -> bool:
        if not self.samples or self.now is None or self.peak <= 0:
            return not self.samples  # no LR series: the condition cannot be checked
        return self.now >= frac * self.peak


def detect_instability(
    loss: Iterable[SampleLike],
    lr: Iterable[SampleLike] = (),
    cfg: InstabilityConfig = InstabilityConfig(),
    *,
    after: int | None = None,
) -> Finding | None:
    """First episode of sustained instability in `loss` (see the module docstring for the rule).
    Onset = where the smoothed loss left its best (the first unsettled median, less half the
    median's span); the episode ends when the smoothed loss settles back near the best."""
    samples = [s for s in sorted_samples(loss) if math.isfinite(s.value)]
    lrs = _LrTrack(sorted_samples(lr))
    roll = RollingMedian(cfg.smooth)
    long = RollingMedian(cfg.best_smooth)
    resid = RollingMedian(4 * cfg.smooth)  # |x - m| / |m| over settled samples: the loss's relative noise
    half = cfg.smooth // 2
    best = math.inf
    start = -1  # index of the first unsettled median of the episode, -1 while settled
    n_high = swings = direction = 0  # direction of m's zigzag: +1 rising, -1 falling
    extreme = 0.0  # m at the last turning point candidate
    noise_m = 0.0  # relative std of m (from the settled history), frozen while an episode lasts
    calm = 0  # consecutive settled samples
    last_unsettled = -1
    found: dict[str, Any] | None = None
    for i, s in enumerate(samples):
        roll.push(s.value)
        long.push(s.value)
        lrs.advance(s.step)
        if len(roll) < cfg.smooth:
            continue
        m = roll.median()
        if start < 0:
            resid.push(abs(s.value - m) / max(abs(m), 1e-12))
            noise_m = _MEDIAN_EFFICIENCY * MAD_TO_SIGMA * resid.median() / math.sqrt(cfg.smooth)
            if i + 1 < cfg.min_history:
                continue
            best = min(best, long.median())
        settle_thr = cfg.settle * abs(best) + cfg.noise_settle * noise_m * abs(best)
        if m - best <= settle_thr:
            calm += 1
            if start >= 0 and calm < cfg.recovery:
                pass  # a dip near the best inside an oscillation: the episode goes on
            else:
                if found is not None:
                    return _finding(samples, cfg, found, end_i=last_unsettled)
                start = -1  # settled: noise, a hump or a recovery, not a sustained instability
                continue
        else:
            calm = 0
            last_unsettled = i
            if start < 0:  # the smoothed loss left its best: an episode may be starting
                start, n_high, swings, direction, extreme = i, 0, 0, 1, m
        rise_thr = max(cfg.rise * abs(best) + cfg.noise_rise * noise_m * abs(best), cfg.min_abs_rise)
        if m - best >= rise_thr:
            n_high += 1
        # m's zigzag: a reversal counts when m moved back from its last extreme by more than the swing
        swing = max(cfg.swing, cfg.noise_k * noise_m)
        if direction > 0:
            if m > extreme:
                extreme = m
            elif extreme - m >= swing * abs(extreme):
                swings, direction, extreme = swings + 1, -1, m
        elif m < extreme:
            extreme = m
        elif m - extreme >= swing * abs(extreme):
            swings, direction, extreme = swings + 1, 1, m
        length = i - start + 1
        if (found is None and length >= cfg.window and n_high >= cfg.min_fraction * length
                and swings >= cfg.min_swings and lrs.high(cfg.lr_high)):
            onset_i = max(start - half, 0)
            if after is None or samples[onset_i].step > after:
                found = {
                    "onset_i": onset_i,
                    "detected_i": i,
                    "evidence": {
                        "best_median": best,
                        "rolling_median": m,
                        "score": (m - best) / abs(best) if best != 0 else None,
                        "threshold": rise_thr / abs(best) if best != 0 else None,
                        "high_fraction": n_high / length,
                        "swings": swings,
                        "swing_threshold": swing,
                        "lr": lrs.now,
                        "lr_peak": lrs.peak if lrs.samples else None,
                        "episode_samples": length,
                    },
                }
    if found is not None:
        return _finding(samples, cfg, found, end_i=None)
    return None


def instability_ruled_out(smoothed: Sequence[float], long: Sequence[float],
                          cfg: InstabilityConfig = InstabilityConfig()) -> bool:
    """True when `detect_instability` with `cfg` cannot find anything in a window whose rolling
    medians are `smoothed` (over `cfg.smooth` finite samples) and `long` (over `cfg.best_smooth`),
    both from the window's (`cfg.min_history` - 1)-th finite sample on, aligned; False: scan it.

    Why it is exact: an episode needs >= min_fraction x window samples whose smoothed m is
    >= best + max(rise |best|, min_abs_rise) (the noise term only adds). The scan's best is one of
    the long medians before it (from min_history on), so >= L, their running minimum; for
    L >= 0 that bound is non-decreasing in best (in floating point too, up to the rounding of
    m - best, which the 1e-12 covers). Fewer such samples against L than an episode needs:
    none. Checked by blocks of 32: a block whose largest m is under the bound of the lowest L in
    it has none."""
    n = min(len(smoothed), len(long))
    if n == 0:
        return True
    if min(long[:n]) < 0:
        return False  # below zero the bound is not monotone in best: scan
    need = math.ceil(cfg.min_fraction * cfg.window)
    rise, a = cfg.rise, cfg.min_abs_rise
    low = math.inf
    count = 0
    for b in range(0, n, 32):
        ms, ls = smoothed[b : min(b + 32, n)], long[b : min(b + 32, n)]
        end = min(low, min(ls))
        if max(ms) < (end + max(rise * abs(end), a)) * (1 - 1e-12):
            low = end
            continue
        for m, lm in zip(ms, ls):
            if lm < low:
                low = lm
            if m >= (low + max(rise * abs(low), a)) * (1 - 1e-12):
                count += 1
                if count >= need:
                    return False
    return True


def _finding(samples: Sequence[Sample], cfg: InstabilityConfig, found: dict[str, Any], end_i: int | None) -> Finding:
    o, d = found["onset_i"], found["detected_i"]
    ev = dict(found["evidence"])
    ev["window"] = evidence_window(samples, o - cfg.context, d)
    ev["end_step"] = samples[end_i].step if end_i is not None else None
    return Finding(IncidentKind.INSTABILITY.value, samples[o].step, samples[d].step, ev)

