"""Simulated training curves for detector tests (deterministic per seed, stdlib only)."""
from __future__ import annotations

import math
import random

from trainguard.service.domain.series import Sample


def healthy_loss(seed: int, steps: int, *, sigma: float | None = None, start: int = 0) -> list[Sample]:
    """A healthy noisy pretraining loss curve.

    Power-law decay towards an irreducible loss, multiplicative lognormal noise, a
    warmup bump (the loss rises ~15% for a while as the LR peaks), LR-decay plateaus
    (step decays drop the loss), a slow oscillation (data-order effects) and
    occasional single-step outliers (1.5-4x)."""
    rng = random.Random(seed)
    sigma = sigma if sigma is not None else rng.choice([0.02, 0.05, 0.08, 0.12])
    l_inf = rng.uniform(1.5, 2.5)
    amp = rng.uniform(2.0, 4.0)
    alpha = rng.uniform(0.3, 0.6)
    t0 = rng.uniform(20, 100)
    warmup = rng.randint(100, 1000)
    bump = rng.uniform(0.05, 0.15)
    decays = sorted(rng.sample(range(steps // 10, max(steps, steps // 10 + 2)), 3))
    osc_period = rng.uniform(300, 3000)
    osc_amp = rng.uniform(0.0, 0.02)
    out = []
    drop = 1.0
    for t in range(steps):
        base = l_inf + amp * (t + t0) ** -alpha
        # warmup bump: a smooth rise around the end of warmup, then back
        base *= 1.0 + bump * math.exp(-(((t - warmup) / (0.3 * warmup)) ** 2))
        if t in decays:
            drop *= rng.uniform(0.93, 0.98)  # LR step decay: the loss falls to a new plateau
        base = l_inf * drop + (base - l_inf)
        base *= 1.0 + osc_amp * math.sin(2 * math.pi * t / osc_period)
        v = base * math.exp(rng.gauss(0.0, sigma))
        if rng.random() < 1e-3:
            v *= rng.uniform(1.5, 4.0)  # a single bad batch
        out.append(Sample(start + t, v, float(t)))
    return out


def inject_spike(samples: list[Sample], at: int, duration: int, factor: float) -> list[Sample]:
    """Multiply the loss by `factor` for `duration` samples from index `at`."""
    out = list(samples)
    for i in range(at, min(at + duration, len(out))):
        s = out[i]
        out[i] = Sample(s.step, s.value * factor, s.time)
    return out


def inject_divergence(samples: list[Sample], at: int, rate: float = 0.01) -> list[Sample]:
    """From index `at`, the loss grows by `rate` per sample (exponential blow-up)."""
    out = list(samples)
    for i in range(at, len(out)):
        s = out[i]
        out[i] = Sample(s.step, s.value * (1.0 + rate) ** (i - at), s.time)
    return out
