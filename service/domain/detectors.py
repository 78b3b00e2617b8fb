"""Incident detectors: pure functions from step-aligned windows to a `Finding`.

Every detector takes plain data (samples sorted by step; see `series.py`), a
frozen config with documented defaults, and returns the first episode it finds
as a `Finding`, or None. Nothing here reads a clock, a socket or a database.

Shared conventions:
- Windows count *samples*, not steps: a sparse window from Prometheus scrapes
  works like a dense one from the workers' /history, only with coarser onsets.
- `after=S` reports only episodes that start after step S. The supervisor passes
  the end of the last incident; `service.analyze` passes the end of the episode it
  just reported (`evidence["end_step"]`) to keep scanning a whole log.
- `onset_step` is the first step that looked wrong; `detected_at_step` is the
  step at which the evidence became conclusive (e.g. the `persistence`-th
  consecutive bad sample).
- `evidence` is JSON-serialisable: the triggering (step, value) pairs under
  "window" (non-finite values as the strings "nan", "inf", "-inf"), the score and
  the threshold it crossed, and "end_step" (last step of the episode, None while
  it is still going on).

Defaults are tuned on simulated healthy curves (power-law decay, lognormal noise
of 2-12% per step, warmup bumps, single-step 1.5-4x outliers, LR-decay plateaus;
tests/unit/service/curves.py): no loss_spike or divergence finding in 1,000,000
steps (none either at 15-20% noise), and of 800 injected 2-10x spikes lasting 2-200
steps 99% are found with the onset exact and 99.5% within 2 steps; the few misses are
2x spikes of 2-5 steps on the noisiest curves.
"""
from __future__ import annotations

import bisect
import enum
import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trainguard.service.domain.series import Sample, SampleLike, Window, as_samples, asof

__all__ = [
    "IncidentKind",
    "Finding",
    "LossSpikeConfig",
    "GradExplosionConfig",
    "DivergenceConfig",
    "NanConfig",
    "ValDivergenceConfig",
    "RewardHackingConfig",
    "DpoCollapseConfig",
    "HangConfig",
    "StragglerConfig",
    "GpuFaultConfig",
    "detect_loss_spike",
    "detect_grad_explosion",
    "detect_divergence",
    "detect_nan",
    "detect_val_divergence",
    "detect_reward_hacking",
    "detect_dpo_collapse",
    "detect_hang",
    "detect_straggler",
    "detect_worker_lost",
    "detect_gpu_fault",
]

_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


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


# --------------------------------------------------------------------------- helpers


def _json_value(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)  # "nan" / "inf" / "-inf": JSON columns reject NaN


def _pairs(samples: Sequence[Sample], lo: int, hi: int, cap: int = 64) -> list[list]:
    """Evidence window: samples[lo..hi] inclusive, the last `cap` of them."""
    lo = max(lo, hi + 1 - cap, 0)
    return [[s.step, _json_value(s.value)] for s in samples[lo : hi + 1]]


def _prepare(xs: Iterable[SampleLike]) -> list[Sample]:
    return list(xs) if isinstance(xs, Window) else as_samples(xs)


def _median_sorted(xs: list[float]) -> float:
    n = len(xs)
    m = n // 2
    return xs[m] if n % 2 else 0.5 * (xs[m - 1] + xs[m])


class _RollingMedian:
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


# --------------------------------------------------------------------------- robust excursions


@dataclass(frozen=True, slots=True, kw_only=True)
class LossSpikeConfig:
    """Loss spike: a robust jump over the recent healthy baseline that persists."""

    window: int = 32
    """Healthy samples in the baseline (median/MAD). Short, so a decaying loss lags little."""
    min_history: int = 16
    """Healthy samples needed before anything is scored (the first steps are never a spike)."""
    threshold: float = 6.0
    """Robust z-score (value - median) / (1.4826 * MAD) a sample must reach."""
    min_ratio: float = 1.5
    """...and the value must be at least this multiple of the baseline median (|median| + (ratio-1)|median| for losses <= 0)."""
    persistence: int = 2
    """Consecutive samples over threshold before it is an incident (one noisy step is not)."""
    recovery: int = 3
    """Consecutive healthy samples that end an episode (a dip inside a spike does not split it)."""
    rel_scale_floor: float = 0.01
    """Noise scale floor, as a fraction of |median|, for very smooth curves (MAD near 0)."""
    abs_scale_floor: float = 1e-6
    """Absolute noise scale floor (a constant series)."""
    context: int = 8
    """Samples before the onset kept in the evidence window."""

    def __post_init__(self) -> None:
        if self.window < 3 or self.min_history < 3 or self.min_history > self.window:
            raise ValueError(f"need 3 <= min_history ({self.min_history}) <= window ({self.window})")
        if self.persistence < 1 or self.recovery < 1:
            raise ValueError("persistence and recovery must be >= 1")
        if self.threshold <= 0 or self.min_ratio < 1:
            raise ValueError("threshold must be > 0 and min_ratio >= 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class GradExplosionConfig(LossSpikeConfig):
    """Gradient explosion: the grad norm (before clipping) far above its robust baseline, persisting.

    Same fields as `LossSpikeConfig`; healthy grad norms are heavier-tailed than the
    loss, so the defaults ask for a larger, longer excursion."""

    threshold: float = 8.0
    min_ratio: float = 3.0
    persistence: int = 3


def _scan_excursions(kind: str, samples: Sequence[Sample], cfg: LossSpikeConfig, after: int | None) -> Finding | None:
    base = _RollingMedian(cfg.window)
    run: list[int] = []  # indices of over-threshold samples of the current run / episode
    in_episode = False  # the run reached `persistence`; it ends after `recovery` healthy samples
    found: dict[str, Any] | None = None
    healthy_streak = 0
    onset_med = onset_scale = 0.0
    for i, s in enumerate(samples):
        v = s.value
        if not math.isfinite(v):
            continue  # the nan detector's business; neither baseline nor evidence of a spike
        over, med = False, 0.0
        if len(base) >= cfg.min_history:
            med = base.median()
            jump = v - med
            # cheap ratio test first: the MAD costs a sort, and most samples fail the ratio
            if jump > 0 and jump >= (cfg.min_ratio - 1.0) * abs(med):
                scale = max(_MAD_TO_SIGMA * base.mad(med), cfg.rel_scale_floor * abs(med), cfg.abs_scale_floor)
                over = jump / scale >= cfg.threshold
        if over:
            if not run:
                onset_med = med
                onset_scale = max(_MAD_TO_SIGMA * base.mad(med), cfg.rel_scale_floor * abs(med), cfg.abs_scale_floor)
            run.append(i)
            healthy_streak = 0
            if not in_episode and len(run) >= cfg.persistence:
                in_episode = True
                if after is None or samples[run[0]].step > after:
                    found = _excursion_evidence(samples, run, i, onset_med, onset_scale, cfg)
            continue
        base.push(v)  # only healthy samples make the baseline: a spike never raises its own bar
        if in_episode:
            healthy_streak += 1
            if healthy_streak < cfg.recovery:
                continue
            if found is not None:
                return _excursion_finding(kind, samples, cfg, found, end_i=run[-1])
            in_episode = False
        run = []
    if found is not None:
        return _excursion_finding(kind, samples, cfg, found, end_i=None)
    return None


def _excursion_evidence(samples, run, i, med, scale, cfg) -> dict[str, Any]:
    scores = [(samples[j].value - med) / scale for j in run]
    o = run[0]
    return {
        "onset_i": o,
        "detected_i": i,
        "evidence": {
            "baseline_median": med,
            "scale": scale,
            "score": max(scores),
            "onset_score": scores[0],
            "threshold": cfg.threshold,
            "ratio": samples[o].value / med if med > 0 else None,
            "min_ratio": cfg.min_ratio,
            "persistence": cfg.persistence,
        },
    }


def _excursion_finding(kind: str, samples: Sequence[Sample], cfg: LossSpikeConfig, found: dict, end_i: int | None) -> Finding:
    o, d = found["onset_i"], found["detected_i"]
    ev = dict(found["evidence"])
    ev["window"] = _pairs(samples, o - cfg.context, d)
    ev["end_step"] = samples[end_i].step if end_i is not None else None
    return Finding(kind, samples[o].step, samples[d].step, ev)


def detect_loss_spike(
    loss: Iterable[SampleLike], cfg: LossSpikeConfig = LossSpikeConfig(), *, after: int | None = None
) -> Finding | None:
    """First loss spike in `loss`: >= `persistence` consecutive samples whose robust score
    over the median/MAD of the preceding healthy samples is >= `threshold` (and >=
    `min_ratio` x the median). Onset = the first of them. Non-finite values are skipped."""
    return _scan_excursions(IncidentKind.LOSS_SPIKE.value, _prepare(loss), cfg, after)


def detect_grad_explosion(
    grad_norm: Iterable[SampleLike], cfg: GradExplosionConfig = GradExplosionConfig(), *, after: int | None = None
) -> Finding | None:
    """First gradient explosion in `grad_norm` (the loss-spike test with grad-norm defaults)."""
    return _scan_excursions(IncidentKind.GRAD_EXPLOSION.value, _prepare(grad_norm), cfg, after)


# --------------------------------------------------------------------------- divergence


@dataclass(frozen=True, slots=True, kw_only=True)
class DivergenceConfig:
    """Divergence: the loss's rolling median stays well above the best rolling median seen."""

    window: int = 50
    """Samples per rolling median (absorbs spikes shorter than half of it)."""
    factor: float = 1.3
    """Rolling median must exceed best * factor (best + (factor-1)|best| for losses <= 0)..."""
    min_abs_rise: float = 0.05
    """...and best + this (loss units), so a loss near zero does not diverge on noise."""
    persistence: int = 25
    """Consecutive rolling medians over the threshold before it is an incident."""
    context: int = 8
    """Samples before the onset kept in the evidence window."""

    def __post_init__(self) -> None:
        if self.window < 3 or self.persistence < 1:
            raise ValueError("window must be >= 3 and persistence >= 1")
        if self.factor <= 1 or self.min_abs_rise < 0:
            raise ValueError("factor must be > 1 and min_abs_rise >= 0")


def detect_divergence(
    loss: Iterable[SampleLike], cfg: DivergenceConfig = DivergenceConfig(), *, after: int | None = None
) -> Finding | None:
    """First sustained upward trend of `loss`. Onset = the centre of the last rolling window
    whose median was still below halfway between the best and the threshold (where the
    rise began); the episode ends when the rolling median is back under the threshold."""
    samples = [s for s in _prepare(loss) if math.isfinite(s.value)]
    roll = _RollingMedian(cfg.window)
    half = (cfg.window - 1) // 2
    best = math.inf
    best_i = -1
    last_calm = -1
    run_start = -1
    run_len = 0
    found: dict[str, Any] | None = None
    for i, s in enumerate(samples):
        roll.push(s.value)
        if len(roll) < cfg.window:
            continue
        med = roll.median()
        if med < best and run_len == 0:
            best, best_i = med, i
        thr = best + max((cfg.factor - 1.0) * abs(best), cfg.min_abs_rise)
        if med > thr:
            if run_len == 0:
                run_start = i
            run_len += 1
            if found is None and run_len >= cfg.persistence and (after is None or samples[run_start].step > after):
                onset_i = max(last_calm - half, 0) if last_calm >= 0 else max(best_i - half, 0)
                found = {
                    "onset_i": onset_i,
                    "detected_i": i,
                    "evidence": {
                        "best_median": best,
                        "best_step": samples[best_i - half].step,
                        "rolling_median": med,
                        "threshold": thr,
                        "factor": cfg.factor,
                        "score": med / best if best > 0 else None,
                        "persistence": cfg.persistence,
                    },
                }
            continue
        if found is not None:
            return _divergence_finding(samples, cfg, found, end_i=i - 1)
        run_len = 0
        if med <= best + (thr - best) / 2:
            last_calm = i
    if found is not None:
        return _divergence_finding(samples, cfg, found, end_i=None)
    return None


def _divergence_finding(samples: Sequence[Sample], cfg: DivergenceConfig, found: dict, end_i: int | None) -> Finding:
    o, d = found["onset_i"], found["detected_i"]
    ev = dict(found["evidence"])
    ev["window"] = _pairs(samples, o - cfg.context, d)
    ev["end_step"] = samples[end_i].step if end_i is not None else None
    return Finding(IncidentKind.DIVERGENCE.value, samples[o].step, samples[d].step, ev)


# --------------------------------------------------------------------------- non-finite values and counters


@dataclass(frozen=True, slots=True, kw_only=True)
class NanConfig:
    """Non-finite loss or gradient norm, seen directly or through the guard's counters."""

    anomaly_kinds: tuple[str, ...] = ("nonfinite_loss", "nonfinite_grad")
    """Values of trainguard_anomalies_total{kind} that count (workers.contract.AnomalyKind)."""
    min_count: int = 1
    """Non-finite steps in one episode before it is an incident. 1: every one is (the guard
    kept it from the weights, but it usually means the state is about to go bad)."""

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise ValueError("min_count must be >= 1")


def _counter_increases(samples: Sequence[Sample]) -> list[tuple[int, int, float]]:
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


def detect_nan(
    loss: Iterable[SampleLike] = (),
    grad_norm: Iterable[SampleLike] = (),
    anomalies: Mapping[str, Iterable[SampleLike]] | None = None,
    cfg: NanConfig = NanConfig(),
    *,
    after: int | None = None,
) -> Finding | None:
    """First non-finite loss or grad norm, or rise of a nonfinite_* anomaly counter
    (counters are cumulative samples of trainguard_anomalies_total, keyed by kind)."""
    events: list[tuple[int, int, str, float]] = []  # (onset_step, seen_at_step, source, count)
    for name, xs in (("loss", loss), ("grad_norm", grad_norm)):
        for s in _prepare(xs):
            if not math.isfinite(s.value):
                events.append((s.step, s.step, name, 1.0))
    for kind, xs in (anomalies or {}).items():
        if kind not in cfg.anomaly_kinds:
            continue
        ss = _prepare(xs)
        for i, onset, inc in _counter_increases(ss):
            events.append((onset, ss[i].step, f"anomalies{{kind={kind}}}", inc))
    events = sorted(e for e in events if after is None or e[0] > after)
    if not events:
        return None
    # The loss and the counter usually report the same step twice; count distinct onsets
    # from direct observations, and counter increases by their size.
    total = 0.0
    seen_direct: set[int] = set()
    for j, (onset, at, src, n) in enumerate(events):
        if src in ("loss", "grad_norm"):
            if onset in seen_direct:
                continue
            seen_direct.add(onset)
        total += n
        if total >= cfg.min_count:
            first = events[0]
            return Finding(
                IncidentKind.NAN.value,
                first[0],
                max(e[1] for e in events[: j + 1]),
                {
                    "events": [{"step": e[0], "seen_at_step": e[1], "source": e[2], "count": e[3]} for e in events[: j + 1][-32:]],
                    "count": total,
                    "threshold": cfg.min_count,
                    "window": [[e[0], "nan"] for e in events[: j + 1] if e[2] in ("loss", "grad_norm")][-32:],
                    "end_step": max(e[1] for e in events[: j + 1]),
                },
            )
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuFaultConfig:
    """GPU fault: an Xid or ECC error counter (trainguard_gpu_*_errors_total) increased."""

    min_increase: int = 1
    """Increase, summed over all counters, that makes an incident."""

    def __post_init__(self) -> None:
        if self.min_increase < 1:
            raise ValueError("min_increase must be >= 1")


def detect_gpu_fault(
    counters: Mapping[str, Iterable[SampleLike]], cfg: GpuFaultConfig = GpuFaultConfig(), *, after: int | None = None
) -> Finding | None:
    """First rise of any GPU error counter. `counters` maps a name (e.g. "xid/rank0",
    "ecc/rank1") to cumulative samples by step."""
    events = []
    for name, xs in counters.items():
        ss = _prepare(xs)
        for i, onset, inc in _counter_increases(ss):
            if after is None or onset > after:
                events.append((onset, ss[i].step, name, inc))
    events.sort()
    total = 0.0
    for j, (onset, at, name, inc) in enumerate(events):
        total += inc
        if total >= cfg.min_increase:
            evs = events[: j + 1]
            return Finding(
                IncidentKind.GPU_FAULT.value,
                evs[0][0],
                max(e[1] for e in evs),
                {
                    "counters": sorted({e[2] for e in evs}),
                    "increase": total,
                    "threshold": cfg.min_increase,
                    "window": [[e[1], e[3]] for e in evs][-32:],
                    "end_step": max(e[1] for e in evs),
                },
            )
    return None


# --------------------------------------------------------------------------- stage-specific


def _trailing_median(samples: Sequence[Sample], step: int, n: int) -> float | None:
    """Median of the last `n` finite samples at or before `step`."""
    i = bisect.bisect_right([s.step for s in samples], step)
    vals = [s.value for s in samples[max(0, i - n) : i] if math.isfinite(s.value)]
    return statistics.median(vals) if vals else None


@dataclass(frozen=True, slots=True, kw_only=True)
class ValDivergenceConfig:
    """Overfitting (SFT): validation loss rising for several evaluations while train loss falls."""

    evaluations: int = 3
    """Consecutive evaluations whose smoothed value is above the best by `min_rise`."""
    smooth: int = 3
    """Evaluations in the rolling median that smooths the validation loss (1: raw values)."""
    min_rise: float = 0.03
    """Relative rise over the best smoothed validation loss that counts (0.03 = 3%)."""
    train_window: int = 20
    """Train-loss samples in the trailing median compared at the best and the latest evaluation."""
    train_min_drop: float = 0.0
    """Relative fall of the smoothed train loss required since the best evaluation (0: any fall)."""

    def __post_init__(self) -> None:
        if self.evaluations < 1 or self.smooth < 1 or self.train_window < 1 or self.min_rise < 0 or self.train_min_drop < 0:
            raise ValueError("evaluations, smooth and train_window must be >= 1; min_rise, train_min_drop >= 0")


def detect_val_divergence(
    val_loss: Iterable[SampleLike],
    train_loss: Iterable[SampleLike],
    cfg: ValDivergenceConfig = ValDivergenceConfig(),
    *,
    after: int | None = None,
) -> Finding | None:
    """First stretch of `evaluations` smoothed validation losses above best*(1+min_rise),
    still rising over the stretch, while the smoothed train loss is lower than at the best
    evaluation. Onset = the first evaluation over; evidence["best_step"] = the evaluation
    worth keeping."""
    val = [s for s in _prepare(val_loss) if math.isfinite(s.value)]
    train = _prepare(train_loss)
    roll = _RollingMedian(cfg.smooth)
    sm: list[float] = []
    best_i = -1
    run: list[int] = []
    found = None
    for i, s in enumerate(val):
        roll.push(s.value)
        sm.append(roll.median())
        if best_i < 0:
            best_i = i
            continue
        best = sm[best_i]
        thr = best + cfg.min_rise * abs(best)
        if sm[i] > thr:
            run.append(i)
            rising = sm[i] >= sm[run[0]]
            if found is None and len(run) >= cfg.evaluations and rising and (after is None or val[run[0]].step > after):
                t_best = _trailing_median(train, val[best_i].step, cfg.train_window)
                t_now = _trailing_median(train, s.step, cfg.train_window)
                if t_best is not None and t_now is not None and t_now < t_best - cfg.train_min_drop * abs(t_best):
                    found = (run[0], i, best_i, thr, t_best, t_now, sm[i])
            continue
        if found is not None:
            return _val_finding(val, found, end_i=i - 1)
        run = []
        if sm[i] < best:
            best_i = i
    return _val_finding(val, found, end_i=None) if found is not None else None


def _val_finding(val: Sequence[Sample], found: tuple, end_i: int | None) -> Finding:
    o, d, b, thr, t_best, t_now, smoothed = found
    return Finding(
        IncidentKind.VAL_DIVERGENCE.value,
        val[o].step,
        val[d].step,
        {
            "best_step": val[b].step,
            "best_val_loss": val[b].value,
            "val_loss_smoothed": smoothed,
            "threshold": thr,
            "score": val[d].value / val[b].value if val[b].value > 0 else None,
            "train_loss_at_best": t_best,
            "train_loss_now": t_now,
            "window": _pairs(val, b, d),
            "end_step": val[end_i].step if end_i is not None else None,
        },
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RewardHackingConfig:
    """PPO reward hacking: reward rising while the KL to the reference is far over its target."""

    kl_factor: float = 2.0
    """KL must exceed kl_factor x the target (trainguard_kl_target, the adaptive controller's goal)..."""
    persistence: int = 10
    """...for this many consecutive KL samples."""
    reward_window: int = 20
    """Reward samples before the excursion whose median is the baseline the reward must beat."""
    kl_target: float | None = None
    """Target used when the caller gives none (None: no target, no detection)."""

    def __post_init__(self) -> None:
        if self.kl_factor <= 1 or self.persistence < 1 or self.reward_window < 1:
            raise ValueError("kl_factor must be > 1; persistence and reward_window >= 1")


def detect_reward_hacking(
    reward: Iterable[SampleLike],
    kl: Iterable[SampleLike],
    kl_target: float | Iterable[SampleLike] | None = None,
    cfg: RewardHackingConfig = RewardHackingConfig(),
    *,
    after: int | None = None,
) -> Finding | None:
    """First stretch where KL > kl_factor x target for `persistence` samples while the
    median reward over the stretch beats the median before it. Onset = the first KL
    sample over."""
    rew = [s for s in _prepare(reward) if math.isfinite(s.value)]
    kls = [s for s in _prepare(kl) if math.isfinite(s.value)]
    if kl_target is None:
        kl_target = cfg.kl_target
    if kl_target is None or not rew or not kls:
        return None
    target_series = None if isinstance(kl_target, (int, float)) else _prepare(kl_target)

    def target_at(step: int) -> float | None:
        if target_series is None:
            return float(kl_target)  # type: ignore[arg-type]
        t = asof(target_series, step)
        return t.value if t is not None else None

    rew_steps = [s.step for s in rew]
    run: list[int] = []
    found = None
    for i, s in enumerate(kls):
        t = target_at(s.step)
        if t is not None and t > 0 and s.value > cfg.kl_factor * t:
            run.append(i)
            if found is None and len(run) >= cfg.persistence and (after is None or kls[run[0]].step > after):
                o_step = kls[run[0]].step
                lo = bisect.bisect_left(rew_steps, o_step)
                hi = bisect.bisect_right(rew_steps, s.step)
                before = [r.value for r in rew[max(0, lo - cfg.reward_window) : lo]]
                during = [r.value for r in rew[lo:hi]]
                if before and during and statistics.median(during) > statistics.median(before):
                    found = (run[0], i, t, statistics.median(before), statistics.median(during))
            continue
        if found is not None:
            return _reward_finding(kls, cfg, found, end_i=i - 1)
        run = []
    return _reward_finding(kls, cfg, found, end_i=None) if found is not None else None


def _reward_finding(kls: Sequence[Sample], cfg: RewardHackingConfig, found: tuple, end_i: int | None) -> Finding:
    o, d, t, r_before, r_during = found
    return Finding(
        IncidentKind.REWARD_HACKING.value,
        kls[o].step,
        kls[d].step,
        {
            "kl_target": t,
            "threshold": cfg.kl_factor * t,
            "score": kls[d].value / t,
            "reward_before": r_before,
            "reward_during": r_during,
            "persistence": cfg.persistence,
            "window": _pairs(kls, o - 4, d),
            "end_step": kls[end_i].step if end_i is not None else None,
        },
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class DpoCollapseConfig:
    """DPO collapse: the chosen responses' log-prob falls far below its start while the margin grows
    (the policy wins the preference by pushing both responses down)."""

    baseline: int = 10
    """First samples whose median is the start value (of chosen log-prob and of the margin)."""
    window: int = 10
    """Samples per rolling median of both series."""
    rel_drop: float = 0.5
    """Fall of the chosen log-prob, relative to |start|, that counts (0.5: 50% lower)..."""
    min_abs_drop: float = 0.1
    """...and at least this much in nats."""
    persistence: int = 5
    """Consecutive samples in that state before it is an incident."""

    def __post_init__(self) -> None:
        if self.baseline < 1 or self.window < 1 or self.persistence < 1 or self.rel_drop <= 0 or self.min_abs_drop < 0:
            raise ValueError("baseline, window, persistence >= 1; rel_drop > 0; min_abs_drop >= 0")


def detect_dpo_collapse(
    chosen_logprob: Iterable[SampleLike],
    margin: Iterable[SampleLike],
    cfg: DpoCollapseConfig = DpoCollapseConfig(),
    *,
    after: int | None = None,
) -> Finding | None:
    """First stretch of `persistence` samples where the rolling median of the chosen
    log-prob is below start - max(rel_drop*|start|, min_abs_drop) and the rolling median of
    the margin is above its start. Onset = centre of the first such rolling window."""
    ch = [s for s in _prepare(chosen_logprob) if math.isfinite(s.value)]
    mg = [s for s in _prepare(margin) if math.isfinite(s.value)]
    if len(ch) < cfg.baseline + 1 or len(mg) < cfg.baseline:
        return None
    ch_start = statistics.median(s.value for s in ch[: cfg.baseline])
    mg_start = statistics.median(s.value for s in mg[: cfg.baseline])
    floor = ch_start - max(cfg.rel_drop * abs(ch_start), cfg.min_abs_drop)
    roll = _RollingMedian(cfg.window)
    half = (cfg.window - 1) // 2
    run: list[int] = []
    found = None
    for i, s in enumerate(ch):
        roll.push(s.value)
        if i < cfg.baseline:
            continue
        med = roll.median()
        m_now = _trailing_median(mg, s.step, cfg.window)
        if med < floor and m_now is not None and m_now > mg_start:
            run.append(i)
            if found is None and len(run) >= cfg.persistence and (after is None or ch[run[0]].step > after):
                found = (max(run[0] - half, 0), i, med, m_now)
            continue
        if found is not None:
            return _dpo_finding(ch, ch_start, mg_start, floor, found, end_i=i - 1)
        run = []
    return _dpo_finding(ch, ch_start, mg_start, floor, found, end_i=None) if found is not None else None


def _dpo_finding(ch, ch_start, mg_start, floor, found, end_i) -> Finding:
    o, d, med, m_now = found
    return Finding(
        IncidentKind.DPO_COLLAPSE.value,
        ch[o].step,
        ch[d].step,
        {
            "chosen_start": ch_start,
            "chosen_median": med,
            "threshold": floor,
            "margin_start": mg_start,
            "margin_median": m_now,
            "score": med - ch_start,
            "window": _pairs(ch, o - 4, d),
            "end_step": ch[end_i].step if end_i is not None else None,
        },
    )


# --------------------------------------------------------------------------- liveness and hardware


@dataclass(frozen=True, slots=True, kw_only=True)
class HangConfig:
    """Hang: a rank's last-step heartbeat is older than the timeout."""

    timeout_s: float = 120.0
    """Seconds without a finished step before a rank counts as hung."""
    step_time_factor: float = 10.0
    """With a typical step time given, the timeout is at least this many steps long (slow stages)."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.step_time_factor <= 0:
            raise ValueError("timeout_s and step_time_factor must be > 0")


def detect_hang(
    heartbeats: Mapping[int, Sample], now: float, cfg: HangConfig = HangConfig(), *, step_seconds: float | None = None
) -> Finding | None:
    """Ranks whose heartbeat is stale at `now` (unix seconds, the caller's clock).
    `heartbeats[rank]` = Sample(step=last finished step, value=its unix time — the gauge
    trainguard_last_step_timestamp_seconds). Do not call for paused runs."""
    timeout = cfg.timeout_s
    if step_seconds is not None and math.isfinite(step_seconds) and step_seconds > 0:
        timeout = max(timeout, cfg.step_time_factor * step_seconds)
    ages = {rank: now - hb.value for rank, hb in heartbeats.items()}
    hung = sorted(r for r, age in ages.items() if age > timeout)
    if not hung:
        return None
    step = min(heartbeats[r].step for r in hung)
    return Finding(
        IncidentKind.HANG.value,
        step,
        step,
        {
            "ranks": hung,
            "age_seconds": {str(r): ages[r] for r in hung},
            "threshold": timeout,
            "score": max(ages[r] for r in hung),
            "window": [[heartbeats[r].step, heartbeats[r].value] for r in hung],
            "end_step": None,
        },
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class StragglerConfig:
    """Straggler: one rank's median step time well above the other ranks'."""

    window: int = 32
    """Most recent step-time samples per rank in each median."""
    min_samples: int = 8
    """Samples a rank needs before it is compared."""
    factor: float = 1.5
    """Rank median > factor x median of the other ranks' medians..."""
    min_excess_s: float = 0.01
    """...by at least this many seconds (sub-millisecond jitter on tiny steps is not a straggler)."""

    def __post_init__(self) -> None:
        if self.factor <= 1 or self.window < 1 or self.min_samples < 1 or self.min_excess_s < 0:
            raise ValueError("factor must be > 1; window, min_samples >= 1; min_excess_s >= 0")


def detect_straggler(step_seconds: Mapping[int, Iterable[SampleLike]], cfg: StragglerConfig = StragglerConfig()) -> Finding | None:
    """The slowest straggling rank, from per-rank step-time samples (needs >= 2 ranks).
    Onset = first step of that rank's latest run of samples over the threshold."""
    recent = {r: [s for s in _prepare(xs) if math.isfinite(s.value)][-cfg.window :] for r, xs in step_seconds.items()}
    recent = {r: ss for r, ss in recent.items() if len(ss) >= cfg.min_samples}
    if len(recent) < 2:
        return None
    medians = {r: statistics.median(s.value for s in ss) for r, ss in recent.items()}
    worst = None
    for r, m in medians.items():
        others = statistics.median(v for q, v in medians.items() if q != r)
        thr = max(cfg.factor * others, others + cfg.min_excess_s)
        if m > thr and (worst is None or m / max(others, 1e-12) > worst[3]):
            worst = (r, others, thr, m / max(others, 1e-12))
    if worst is None:
        return None
    rank, others, thr, ratio = worst
    ss = recent[rank]
    o = len(ss) - 1
    while o > 0 and ss[o - 1].value > thr:
        o -= 1
    return Finding(
        IncidentKind.STRAGGLER.value,
        ss[o].step,
        ss[-1].step,
        {
            "rank": rank,
            "rank_median_s": medians[rank],
            "others_median_s": others,
            "threshold": thr,
            "score": ratio,
            "window": _pairs(ss, 0, len(ss) - 1),
            "end_step": None,
        },
    )


def detect_worker_lost(status: Mapping[str, Any]) -> Finding | None:
    """Ranks that died, from `WorkerGroup.poll()`: {"state", "ranks": [{"rank", "step",
    "state", "alive", "error"}], "failed_rank", "error"}. A rank that finished or was
    stopped is not lost; a group in state "failed" is."""
    ranks = list(status.get("ranks") or [])
    lost = [r for r in ranks if not r.get("alive", True) and r.get("state") not in ("finished", "stopped")]
    if not lost and status.get("state") == "failed":
        fr = status.get("failed_rank")
        lost = [r for r in ranks if r.get("rank") == fr] or ranks[:1] or [{"rank": fr, "step": None}]
    if not lost:
        return None
    steps = [int(r["step"]) for r in lost if r.get("step") is not None]
    step = min(steps) if steps else 0
    return Finding(
        IncidentKind.WORKER_LOST.value,
        step,
        step,
        {
            "ranks": [r.get("rank") for r in lost],
            "errors": {str(r.get("rank")): r.get("error") for r in lost if r.get("error")},
            "group_error": status.get("error"),
            "window": [[r.get("step"), 0.0] for r in lost],
            "end_step": None,
        },
    )
