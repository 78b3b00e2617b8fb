"""Detectors for the post-training stages: validation divergence (SFT overfitting),
reward hacking (PPO) and DPO collapse. Each compares two series of the same run."""
from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from trainguard.service.domain.detectors.base import Finding, IncidentKind, RollingMedian, evidence_window, sorted_samples
from trainguard.service.domain.series import Sample, SampleLike, asof

__all__ = [
    "ValDivergenceConfig",
    "RewardHackingConfig",
    "DpoCollapseConfig",
    "detect_val_divergence",
    "detect_reward_hacking",
    "detect_dpo_collapse",
]


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
    val = [s for s in sorted_samples(val_loss) if math.isfinite(s.value)]
    train = sorted_samples(train_loss)
    roll = RollingMedian(cfg.smooth)
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


def _val_finding(val: Sequence[Sample], found: tuple[Any, ...], end_i: int | None) -> Finding:
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
            "window": evidence_window(val, b, d),
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
    rew = [s for s in sorted_samples(reward) if math.isfinite(s.value)]
    kls = [s for s in sorted_samples(kl) if math.isfinite(s.value)]
    if kl_target is None:
        kl_target = cfg.kl_target
    if kl_target is None or not rew or not kls:
        return None
    target_series = None if isinstance(kl_target, (int, float)) else sorted_samples(kl_target)

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


def _reward_finding(kls: Sequence[Sample], cfg: RewardHackingConfig, found: tuple[Any, ...], end_i: int | None) -> Finding:
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
            "window": evidence_window(kls, o - 4, d),
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
    ch = [s for s in sorted_samples(chosen_logprob) if math.isfinite(s.value)]
    mg = [s for s in sorted_samples(margin) if math.isfinite(s.value)]
    if len(ch) < cfg.baseline + 1 or len(mg) < cfg.baseline:
        return None
    ch_start = statistics.median(s.value for s in ch[: cfg.baseline])
    mg_start = statistics.median(s.value for s in mg[: cfg.baseline])
    floor = ch_start - max(cfg.rel_drop * abs(ch_start), cfg.min_abs_drop)
    roll = RollingMedian(cfg.window)
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


def _dpo_finding(
    ch: Sequence[Sample], ch_start: float, mg_start: float, floor: float, found: tuple[Any, ...], end_i: int | None
) -> Finding:
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
            "window": evidence_window(ch, o - 4, d),
            "end_step": ch[end_i].step if end_i is not None else None,
        },
    )
