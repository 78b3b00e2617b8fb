"""Sustained-instability detector on simulated curves: it flags a loss that keeps oscillating
well above its best while the LR is high, and stays quiet on healthy noise, slow plateaus,
noisy first steps, single spikes and a decayed LR."""
from __future__ import annotations

import math
import random

import pytest

from trainguard.service.domain import detectors as d
from trainguard.service.domain.evaluate import WatchConfig, evaluate_stage
from trainguard.service.domain.policy import Action, CheckpointInfo, RecoveryConfig, RunSnapshot, decide
from trainguard.service.domain.series import Sample
from tests.unit.service.curves import healthy_loss, inject_divergence, inject_spike

ONSET = 2000
DEADLINE = 500  # steps from the instability's start to the alarm (issue 14)


def lr_schedule(n: int, *, warmup: int = 500, peak: float = 1e-3) -> list[Sample]:
    """Linear warmup, then cosine decay to 10% of the peak."""
    out = []
    for t in range(n):
        if t < warmup:
            lr = peak * (t + 1) / warmup
        else:
            lr = peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (t - warmup) / max(n - warmup, 1))))
        out.append(Sample(t, lr))
    return out


def oscillating(seed: int, n: int, at: int, *, amp: float = 0.6, period: float = 150.0) -> list[Sample]:
    """A healthy curve that turns unstable at `at`: the loss oscillates between about
    (1 + 0.2 amp) and (1 + amp) times where it would have been, with a jittered period,
    for the rest of the run (no single spike: it ramps up over 30 steps)."""
    rng = random.Random(seed + 1000)
    out = list(healthy_loss(seed, n, sigma=0.05))
    phase = 0.0
    for i in range(at, n):
        phase += 2 * math.pi / (period * rng.uniform(0.7, 1.3))
        factor = 1 + amp * (0.6 + 0.4 * math.sin(phase)) * min(1.0, (i - at) / 30)
        s = out[i]
        out[i] = Sample(s.step, s.value * factor, s.time)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_healthy_noisy_runs_raise_no_instability(seed):
    xs = healthy_loss(seed, 20_000)
    assert d.detect_instability(xs, lr_schedule(20_000)) is None
    assert d.detect_instability(xs) is None  # nor without an LR series


@pytest.mark.parametrize("sigma", [0.02, 0.12])
def test_slow_plateau_is_not_instability(sigma):
    rng = random.Random(3)
    # the loss decays, then sits on a plateau for 8,000 steps (a slow plateau, not an oscillation)
    xs = [Sample(t, (2.0 + 1.5 * max(0.0, 1 - t / 2000)) * math.exp(rng.gauss(0, sigma))) for t in range(10_000)]
    assert d.detect_instability(xs, lr_schedule(10_000)) is None


def test_noisy_early_steps_are_not_instability():
    rng = random.Random(5)
    # the first 300 steps: a fast fall with 40% noise and a rebound, then a normal decay
    xs = [Sample(t, (2.0 + 8.0 * math.exp(-t / 60) + (1.0 if 80 < t < 160 else 0.0))
                 * math.exp(rng.gauss(0, 0.4 if t < 300 else 0.05))) for t in range(3000)]
    assert d.detect_instability(xs, lr_schedule(3000, warmup=100)) is None


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("period", [60, 150, 300])
def test_lr_too_high_oscillation_is_flagged_within_500_steps(seed, period):
    xs = oscillating(seed, 5000, ONSET, period=period)
    f = d.detect_instability(xs, lr_schedule(5000, warmup=200))
    assert f is not None and f.kind == "instability"
    assert abs(f.onset_step - ONSET) <= 50
    assert ONSET < f.detected_at_step <= ONSET + DEADLINE
    ev = f.evidence
    assert ev["swings"] >= d.InstabilityConfig().min_swings
    assert ev["high_fraction"] >= d.InstabilityConfig().min_fraction
    assert ev["lr"] is not None and ev["lr"] >= 0.5 * ev["lr_peak"]


def test_oscillation_while_lr_is_low_is_not_blamed_on_the_lr():
    xs = oscillating(1, 5000, ONSET)
    lr = [Sample(t, 1e-3 if t < 1000 else 1e-4) for t in range(5000)]  # decayed to 10% before the onset
    assert d.detect_instability(xs, lr) is None
    assert d.detect_instability(xs) is not None  # without an LR series the loss alone decides


def test_episode_ends_when_the_loss_settles_and_after_skips_it():
    xs = oscillating(2, 5000, ONSET)
    calm = healthy_loss(2, 5000, sigma=0.05)
    xs = xs[:3000] + calm[3000:]  # the LR was lowered at 3000: back on the healthy curve
    f = d.detect_instability(xs)
    assert f is not None and f.evidence["end_step"] is not None and 2900 <= f.evidence["end_step"] < 3100
    assert d.detect_instability(xs, after=f.evidence["end_step"]) is None


@pytest.mark.parametrize("duration", [2, 10, 100])
def test_isolated_spikes_are_the_spike_detectors_not_this_ones(duration):
    xs = inject_spike(healthy_loss(4, 6000, sigma=0.05), 3000, duration, 4.0)
    assert d.detect_loss_spike(xs) is not None
    assert d.detect_instability(xs) is None


def test_divergence_is_not_instability():
    xs = inject_divergence(healthy_loss(6, 4000, sigma=0.05), 2000, rate=0.002)
    assert d.detect_divergence(xs) is not None
    assert d.detect_instability(xs) is None  # a monotone rise does not oscillate


def test_config_is_validated():
    with pytest.raises(ValueError):
        d.InstabilityConfig(settle=0.2, rise=0.1)
    with pytest.raises(ValueError):
        d.InstabilityConfig(smooth=50, best_smooth=25)
    with pytest.raises(ValueError):
        RecoveryConfig(instability_action="ignore")


# --------------------------------------------------------------------------- watch and policy


class _Signals:
    kind = "pretrain"
    handled_until: dict[str, int] = {}
    counter_series: dict = {}
    heartbeat: dict = {}
    paused_ranks: set = set()
    started_at = resumed_at = 0.0
    ranks = [0]
    steps = 10**9
    idle: dict = {}

    def __init__(self, loss: list[Sample], lr: list[Sample]) -> None:
        self.records = {0: [{"step": s.step, "loss": s.value, "lr": l.value, "batch_index": s.step}
                            for s, l in zip(loss, lr)]}
        self.last_step = loss[-1].step


def test_watch_reports_instability_over_the_live_buffer():
    loss = oscillating(3, 3000, ONSET)
    lr = lr_schedule(5000, warmup=200)
    # watch cycles every 20 steps over what the supervisor buffers: the last 400 steps per rank
    for end in range(ONSET, ONSET + DEADLINE + 1, 20):
        sig = _Signals(loss[end - 400:end], lr[end - 400:end])
        found = [f for f in evaluate_stage(sig, WatchConfig(), now=0.0) if f.kind == "instability"]
        if found:
            break
    assert len(found) == 1 and abs(found[0].onset_step - ONSET) <= 50
    assert found[0].detected_at_step <= ONSET + DEADLINE


def _ck(step: int) -> CheckpointInfo:
    return CheckpointInfo(step=step, batch_cursor=step + 1, ref=f"ck{step}")


def test_policy_rolls_back_before_the_onset_with_a_lower_lr_and_no_skip():
    f = d.Finding("instability", onset_step=1000, detected_at_step=1300)
    dec = decide(f, RunSnapshot(checkpoints=[_ck(900), _ck(995), _ck(1100)]), RecoveryConfig(margin=10))
    assert dec.action == Action.ROLLBACK and dec.checkpoint_step == 900
    assert dec.skip == [] and dec.lr_target == pytest.approx(0.5) and dec.source == "spike"


def test_policy_notifies_when_configured_to():
    f = d.Finding("instability", onset_step=1000, detected_at_step=1300)
    dec = decide(f, RunSnapshot(checkpoints=[_ck(900)]), RecoveryConfig(instability_action="notify"))
    assert dec.action == Action.NOTIFY and dec.checkpoint_step is None and "instability" in dec.reason


def test_analyze_reports_instability():
    from trainguard.service.analyze import analyze_series

    kinds = {f["kind"] for f in analyze_series({"loss": oscillating(0, 4000, ONSET), "lr": lr_schedule(4000, warmup=200)})}
    assert "instability" in kinds
