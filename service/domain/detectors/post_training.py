"""Detectors for the post-training stages: validation divergence (SFT overfitting),
reward hacking (PPO), DPO collapse, and the health of PPO's updates: the policy ratio,
a negative KL estimate, entropy collapse, response-length collapse or explosion, and the
value loss blowing up."""
from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from trainguard.service.domain.detectors.base import (
    Finding,
    IncidentKind,
    RollingMedian,
    evidence_window,
    json_value,
    sorted_samples,
)
from trainguard.service.domain.series import Sample, SampleLike, asof

__all__ = [
    "ValDivergenceConfig",
    "RewardHackingConfig",
    "DpoCollapseConfig",
    "detect_val_divergence",
    "detect_reward_hacking",
    "detect_dpo_collapse",
    "PolicyRatioConfig",
    "NegativeKlConfig",
    "EntropyCollapseConfig",
    "ResponseLengthConfig",
    "ValueLossConfig",
    "detect_policy_ratio",
    "detect_negative_kl",
    "detect_entropy_collapse",
    "detect_response_length",
    "detect_value_loss_explosion",
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
    train: list[Sample] | None = None  # read when a stretch of evaluations asks for it
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
                if train is None:
                    train = sorted_samples(train_loss)
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


# --------------------------------------------------------------------------- PPO update health
#
# The RLHF signals practitioners watch (TRL's "What to look out for", verl's metrics), one
# detector each. They read the series the PPO stage exports per step (workers/stages/ppo.py):
# rollout-level values (kl, response_length) repeat on every step of a rollout, update-level
# values (ratio, clip fraction, entropy, value loss) change every step. Every detector smooths
# with a rolling median of `window` samples and asks for `persistence` consecutive samples over
# its threshold, so one odd minibatch never counts.


def _finite(xs: Iterable[SampleLike]) -> list[Sample]:
    return [s for s in sorted_samples(xs) if math.isfinite(s.value)]


def _persistent(
    samples: Sequence[Sample],
    over: Any,
    persistence: int,
    after: int | None,
) -> tuple[int, int, int | None] | None:
    """(first index, index where it became conclusive, index of the episode's last sample or
    None while it goes on) of the first stretch of `persistence` consecutive i with over(i)
    true whose first sample is after `after`."""
    run_start: int | None = None
    found: tuple[int, int] | None = None
    for i in range(len(samples)):
        if over(i):
            if run_start is None:
                run_start = i
            if found is None and i - run_start + 1 >= persistence and (after is None or samples[run_start].step > after):
                found = (run_start, i)
            continue
        if found is not None:
            return found[0], found[1], i - 1
        run_start = None
    return (found[0], found[1], None) if found is not None else None


def _rolling(samples: Sequence[Sample], window: int) -> list[float]:
    roll = RollingMedian(window)
    out = []
    for s in samples:
        roll.push(s.value)
        out.append(roll.median())
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyRatioConfig:
    """PPO updates too drastic: the policy ratio pi/pi_old far from 1 (TRL's documentation: a
    mean ratio above 2 means the policy moved much further than the clip allows), or most
    tokens' ratio outside the clip range."""

    max_ratio_mean: float = 2.0
    """Smoothed mean ratio above this counts..."""
    min_ratio_mean: float = 0.5
    """...and so does one below this."""
    max_clip_fraction: float = 0.5
    """Smoothed fraction of tokens whose ratio is outside the clip range above this counts
    (healthy PPO clips 0.1-0.3 of the tokens at most; single minibatches of a healthy tiny run
    at a brisk LR reach 0.4-0.6, their rolling median stays near 0.3)."""
    window: int = 8
    """Samples per rolling median (two rollouts at the stage's defaults; a rollout's first
    minibatch has ratio 1 exactly)."""
    persistence: int = 4
    """Consecutive smoothed samples over a threshold before it is an incident."""

    def __post_init__(self) -> None:
        if not 0 < self.min_ratio_mean < 1 < self.max_ratio_mean or not 0 < self.max_clip_fraction <= 1:
            raise ValueError("need 0 < min_ratio_mean < 1 < max_ratio_mean and 0 < max_clip_fraction <= 1")
        if self.window < 1 or self.persistence < 1:
            raise ValueError("window and persistence must be >= 1")


def detect_policy_ratio(
    ratio_mean: Iterable[SampleLike],
    clip_fraction: Iterable[SampleLike] = (),
    cfg: PolicyRatioConfig = PolicyRatioConfig(),
    *,
    after: int | None = None,
) -> Finding | None:
    """First stretch of `persistence` samples where the rolling median of the mean ratio is
    outside [min_ratio_mean, max_ratio_mean], or that of the clip fraction (as of the same
    step) is above max_clip_fraction. Onset = the first such sample."""
    ratio = _finite(ratio_mean)
    clip = _finite(clip_fraction)
    if not ratio:
        return None
    r_med = _rolling(ratio, cfg.window)
    c_med = _rolling(clip, cfg.window)
    c_steps = [s.step for s in clip]

    def clip_at(i: int) -> float | None:
        j = bisect.bisect_right(c_steps, ratio[i].step) - 1
        return c_med[j] if j >= 0 else None

    def over(i: int) -> bool:
        c = clip_at(i)
        return not cfg.min_ratio_mean <= r_med[i] <= cfg.max_ratio_mean or (c is not None and c > cfg.max_clip_fraction)

    hit = _persistent(ratio, over, cfg.persistence, after)
    if hit is None:
        return None
    o, d, end = hit
    c = clip_at(d)
    by_ratio = not cfg.min_ratio_mean <= r_med[d] <= cfg.max_ratio_mean
    return Finding(
        IncidentKind.POLICY_RATIO.value,
        ratio[o].step,
        ratio[d].step,
        {
            "signal": "ratio_mean" if by_ratio else "clip_fraction",
            "ratio_mean": r_med[d],
            "clip_fraction": c,
            "score": r_med[d] if by_ratio else c,
            "threshold": (cfg.max_ratio_mean if r_med[d] > 1 else cfg.min_ratio_mean) if by_ratio else cfg.max_clip_fraction,
            "persistence": cfg.persistence,
            "window": evidence_window(ratio, o - 4, d),
            "end_step": ratio[end].step if end is not None else None,
        },
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class NegativeKlConfig:
    """The KL estimate to the reference below zero: KL(pi || pi_ref) is never negative, and
    its sampled estimate (the sum of log pi - log pi_ref over a response) is >= 0 in
    expectation when the responses are sampled from pi. A persistently negative estimate
    means they are not: a sampling temperature other than 1, forced or banned tokens, a
    policy/generation mismatch (TRL's documentation: "negative KL")."""

    tolerance: float = 0.1
    """Nats below zero that count..."""
    window: int = 12
    """...for the rolling median of this many samples (three rollouts at the PPO stage's
    defaults): one rollout's estimate is noisy (a healthy tiny run saw -0.2 once), their
    median is not."""
    persistence: int = 4
    """Consecutive smoothed samples below -tolerance before it is an incident."""

    def __post_init__(self) -> None:
        if self.tolerance < 0 or self.window < 1 or self.persistence < 1:
            raise ValueError("tolerance must be >= 0; window and persistence >= 1")


def detect_negative_kl(
    kl: Iterable[SampleLike], cfg: NegativeKlConfig = NegativeKlConfig(), *, after: int | None = None
) -> Finding | None:
    """First stretch of `persistence` samples whose rolling median is below -tolerance.
    Onset = the first negative sample of the window that crossed first."""
    kls = _finite(kl)
    med = _rolling(kls, cfg.window)
    hit = _persistent(kls, lambda i: med[i] < -cfg.tolerance, cfg.persistence, after)
    if hit is None:
        return None
    o, d, end = hit
    lo = max(0, o - cfg.window + 1)
    o = next((j for j in range(lo, o + 1) if kls[j].value < 0 and (after is None or kls[j].step > after)), o)
    return Finding(
        IncidentKind.NEGATIVE_KL.value,
        kls[o].step,
        kls[d].step,
        {
            "kl": kls[d].value,
            "kl_median": med[d],
            "score": med[d],
            "threshold": -cfg.tolerance,
            "persistence": cfg.persistence,
            "window": evidence_window(kls, o - 4, d),
            "end_step": kls[end].step if end is not None else None,
        },
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class EntropyCollapseConfig:
    """Policy entropy collapse: the policy's per-token entropy falls to a small fraction of its
    start (mode collapse: it answers everything the same way, usually while exploiting the
    reward model)."""

    baseline: int = 8
    """First samples whose median is the start value."""
    window: int = 4
    """Samples per rolling median."""
    rel_floor: float = 0.4
    """The smoothed entropy below this fraction of the start counts (healthy PPO loses entropy
    slowly: the tiny pipelines lose about 10% in their 30 steps)."""
    persistence: int = 4
    """Consecutive smoothed samples under the floor before it is an incident."""

    def __post_init__(self) -> None:
        if self.baseline < 1 or self.window < 1 or self.persistence < 1 or not 0 < self.rel_floor < 1:
            raise ValueError("baseline, window, persistence >= 1; 0 < rel_floor < 1")


def detect_entropy_collapse(
    entropy: Iterable[SampleLike], cfg: EntropyCollapseConfig = EntropyCollapseConfig(), *, after: int | None = None
) -> Finding | None:
    """First stretch of `persistence` samples whose rolling median is below rel_floor x the
    median of the first `baseline` samples. Onset = the first such sample."""
    ent = _finite(entropy)
    if len(ent) <= cfg.baseline:
        return None
    start = statistics.median(s.value for s in ent[: cfg.baseline])
    if start <= 0:
        return None
    floor = cfg.rel_floor * start
    med = _rolling(ent, cfg.window)
    hit = _persistent(ent, lambda i: i >= cfg.baseline and med[i] < floor, cfg.persistence, after)
    if hit is None:
        return None
    o, d, end = hit
    return Finding(
        IncidentKind.ENTROPY_COLLAPSE.value,
        ent[o].step,
        ent[d].step,
        {
            "entropy_start": start,
            "entropy_median": med[d],
            "score": med[d] / start,
            "threshold": floor,
            "window": evidence_window(ent, o - 4, d),
            "end_step": ent[end].step if end is not None else None,
        },
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseLengthConfig:
    """Response-length collapse or explosion: the mean length of the sampled responses far
    below or above its start (a reward model that prefers short or long answers, exploited)."""

    baseline: int = 8
    """First samples whose median is the start value."""
    window: int = 4
    """Samples per rolling median."""
    collapse_ratio: float = 0.5
    """The smoothed length below this x the start is a collapse..."""
    explosion_ratio: float = 1.5
    """...above this x the start an explosion (a length already near the stage's response_len
    cannot explode: there the collapse is what can be seen)."""
    persistence: int = 4
    """Consecutive smoothed samples beyond a bound before it is an incident."""

    def __post_init__(self) -> None:
        if self.baseline < 1 or self.window < 1 or self.persistence < 1:
            raise ValueError("baseline, window and persistence must be >= 1")
        if not 0 < self.collapse_ratio < 1 < self.explosion_ratio:
            raise ValueError("need 0 < collapse_ratio < 1 < explosion_ratio")


def detect_response_length(
    length: Iterable[SampleLike], cfg: ResponseLengthConfig = ResponseLengthConfig(), *, after: int | None = None
) -> Finding | None:
    """First stretch of `persistence` samples whose rolling median is below collapse_ratio x
    or above explosion_ratio x the median of the first `baseline` samples (one direction per
    stretch). evidence["direction"]: "collapse" or "explosion"."""
    xs = _finite(length)
    if len(xs) <= cfg.baseline:
        return None
    start = statistics.median(s.value for s in xs[: cfg.baseline])
    if start <= 0:
        return None
    med = _rolling(xs, cfg.window)
    lo, hi = cfg.collapse_ratio * start, cfg.explosion_ratio * start

    def side(i: int) -> int:
        if i < cfg.baseline:
            return 0
        return -1 if med[i] < lo else 1 if med[i] > hi else 0

    best: tuple[int, int, int | None] | None = None
    for direction in (-1, 1):
        hit = _persistent(xs, lambda i, d=direction: side(i) == d, cfg.persistence, after)
        if hit is not None and (best is None or hit[0] < best[0]):
            best = hit
    if best is None:
        return None
    o, d, end = best
    collapse = med[d] < lo
    return Finding(
        IncidentKind.RESPONSE_LENGTH.value,
        xs[o].step,
        xs[d].step,
        {
            "direction": "collapse" if collapse else "explosion",
            "length_start": start,
            "length_median": med[d],
            "score": med[d] / start,
            "threshold": lo if collapse else hi,
            "window": evidence_window(xs, o - 4, d),
            "end_step": xs[end].step if end is not None else None,
        },
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ValueLossConfig:
    """The critic's value loss blowing up: its smoothed value far above the lowest it reached
    (the value head cannot follow the returns: a reward scale that grew, a value learning
    rate far too high, a diverging critic)."""

    window: int = 4
    """Samples per rolling median."""
    factor: float = 10.0
    """The smoothed value loss above factor x max(its running best, floor x its start) counts."""
    floor: float = 0.1
    """Fraction of the start value below which the running best stops lowering the threshold
    (a critic that fits well must not turn ordinary noise into a 10x rise)."""
    persistence: int = 4
    """Consecutive smoothed samples over the threshold before it is an incident."""

    def __post_init__(self) -> None:
        if self.window < 1 or self.persistence < 1 or self.factor <= 1 or not 0 <= self.floor <= 1:
            raise ValueError("window, persistence >= 1; factor > 1; 0 <= floor <= 1")


def detect_value_loss_explosion(
    value_loss: Iterable[SampleLike], cfg: ValueLossConfig = ValueLossConfig(), *, after: int | None = None
) -> Finding | None:
    """First stretch of `persistence` samples whose rolling median exceeds factor x max(the
    lowest earlier rolling median, floor x the first sample), or that are not finite.
    Onset = the first such sample."""
    xs = sorted_samples(value_loss)
    if not xs:
        return None
    roll = RollingMedian(cfg.window)
    med: list[float] = []
    thr: list[float] = []
    best = math.inf
    start: float | None = None
    for s in xs:
        if not math.isfinite(s.value):
            med.append(math.inf)
            thr.append(cfg.factor * best if math.isfinite(best) else math.inf)
            continue
        if start is None:
            start = abs(s.value)
        roll.push(s.value)
        m = roll.median()
        t = cfg.factor * max(best, cfg.floor * start) if math.isfinite(best) else math.inf
        med.append(m)
        thr.append(t)
        if m <= t:
            best = min(best, m)
    hit = _persistent(xs, lambda i: med[i] > thr[i], cfg.persistence, after)
    if hit is None:
        return None
    o, d, end = hit
    return Finding(
        IncidentKind.VALUE_LOSS_EXPLOSION.value,
        xs[o].step,
        xs[d].step,
        {
            "value_loss_median": json_value(med[d]),
            "threshold": json_value(thr[d]),
            "score": json_value(med[d] / (thr[d] / cfg.factor)) if math.isfinite(thr[d]) and thr[d] > 0 else None,
            "window": evidence_window(xs, o - 4, d),
            "end_step": xs[end].step if end is not None else None,
        },
    )
