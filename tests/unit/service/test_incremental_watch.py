"""The incremental watch (issue 13): a rank's RecordBuffer keeps each metric's samples as records
arrive and leave, the detectors' exact "cannot find anything" tests run on what it tracks, and
`evaluate_stage` gives the same findings as a full rescan of plain record lists.

Every test compares against the plain path on randomized series: the buffers' samples against
`_samples` over the records, each quick test against its detector's scan, and whole watch
replays (spikes, divergence, oscillation, NaNs, rollbacks, several ranks) finding for finding."""
from __future__ import annotations

import json
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest

from trainguard.service.domain import detectors
from trainguard.service.domain.detectors.health import _references, _references_grouped
from trainguard.service.domain.evaluate import WatchConfig, _samples, alert_finding, evaluate_stage
from trainguard.service.domain.series import RecordBuffer, Sample, as_samples
from trainguard.service.supervisor.stage import ActiveStage

from tests.unit.service.curves import healthy_loss, inject_divergence, inject_spike


# --------------------------------------------------------------------------- the buffer


def _rec(rng: random.Random, step: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"step": step, "time": float(step)}
    if rng.random() < 0.9:
        rec["loss"] = rng.choice([rng.uniform(1, 3)] * 8 + [math.nan, math.inf, "x", None, "2.5", 3])
    if rng.random() < 0.3:
        rec["anomaly"] = rng.choice(["nonfinite_loss", "loss_spike", None, ""])
    return rec


def test_a_record_buffer_keeps_each_metric_as_reading_its_records_gives_under_any_change():
    rng = random.Random(7)
    buf = RecordBuffer(maxlen=40)
    ks = buf.key_series("loss")
    track = ks.tracker(("median", 5), lambda: detectors.MedianTrack(5))
    step = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.7:
            step += rng.choice([1, 1, 1, 2, 0, -3]) if step > 5 else 1
            buf.append(_rec(rng, step))
        elif op < 0.85 and buf:
            buf.pop()
        elif op < 0.92 and buf:
            buf.popleft()
        elif op < 0.94:
            buf.appendleft(_rec(rng, step - 50))
        elif op < 0.96 and buf:
            del buf[rng.randrange(len(buf))]
        elif op < 0.97:
            buf.extend([_rec(rng, step + 1), _rec(rng, step + 2)])
            step += 2
        elif op < 0.98:
            buf.clear()
        ks = buf.key_series("loss")
        want = _samples(list(buf), "loss")
        assert ks.samples() == want
        assert ks.nonfinite == sum(not math.isfinite(s.value) for s in want)
        steps = [int(r["step"]) for r in buf]
        assert buf.ordered == all(a < b for a, b in zip(steps, steps[1:]))
        assert buf.has_anomaly(["nonfinite_loss"]) == any(r.get("anomaly") == "nonfinite_loss" for r in buf)
        track = ks.tracker(("median", 5), lambda: detectors.MedianTrack(5))
        finite = [s.value for s in want if math.isfinite(s.value)]
        roll = detectors.base.RollingMedian(5)
        meds = []
        for v in finite:
            roll.push(v)
            meds.append(roll.median())
        assert track.full() == meds[4:]  # the window's own full medians


def test_as_samples_keeps_an_ordered_list_as_it_is_and_sorts_anything_else():
    xs = [Sample(1, 1.0), Sample(3, 2.0), Sample(7, 0.5)]
    assert as_samples(xs) == xs and as_samples(xs) is not xs
    assert as_samples([Sample(3, 2.0), Sample(1, 1.0), (3, 5.0)]) == [Sample(1, 1.0), Sample(3, 5.0)]
    assert as_samples([Sample(1, 1.0), Sample(1, 2.0)]) == [Sample(1, 2.0)]


# --------------------------------------------------------------------------- the quick tests


def _windows(seed: int, n: int = 400) -> list[list[Sample]]:
    rng = random.Random(seed)
    base = healthy_loss(seed, 1200)
    kind = seed % 4
    if kind == 1:
        base = inject_spike(base, rng.randint(100, 1100), rng.randint(1, 20), rng.uniform(1.5, 8))
    elif kind == 2:
        base = inject_divergence(base, rng.randint(200, 1000), rng.uniform(0.002, 0.02))
    elif kind == 3:
        at, per, amp = rng.randint(200, 900), rng.uniform(40, 200), rng.uniform(0.1, 0.5)
        base = [Sample(s.step, s.value * (1 + amp * (0.5 + 0.5 * math.sin(2 * math.pi * (s.step - at) / per))
                                          if s.step >= at else 1)) for s in base]
    return [base[max(0, end - n):end] for end in range(40, len(base) + 1, 37)]


@pytest.mark.parametrize("seed", range(12))
def test_each_quick_test_rules_out_only_what_its_scan_does_not_find(seed):
    """Incremental vs full rescan: the trackers fed sample by sample (the buffer trimmed to each
    window) never say "nothing" where the detector's scan of the window finds something; and on
    healthy stretches they do say it (the quick path is taken)."""
    cfg = WatchConfig()
    ruled_out = scanned = 0
    for window in _windows(seed):
        buf = RecordBuffer(maxlen=400)
        for s in window:
            buf.append({"step": s.step, "loss": s.value, "grad_norm": s.value, "time": 0.0})
        ks = buf.key_series("loss")
        spike = ks.tracker(("excursion", cfg.loss_spike), lambda: detectors.ExcursionTrack(cfg.loss_spike))
        grad = ks.tracker(("excursion", cfg.grad_explosion), lambda: detectors.ExcursionTrack(cfg.grad_explosion))
        div = ks.tracker(("median", 50), lambda: detectors.MedianTrack(50))
        sm = ks.tracker(("median", 25), lambda: detectors.MedianTrack(25))
        lg = ks.tracker(("median", 100), lambda: detectors.MedianTrack(100))
        h = cfg.instability.min_history - 1
        checks = [
            (spike.quiet(), detectors.detect_loss_spike(window, cfg.loss_spike)),
            (grad.quiet(), detectors.detect_grad_explosion(window, cfg.grad_explosion)),
            (detectors.divergence_ruled_out(div.full(), cfg.divergence), detectors.detect_divergence(window)),
            (detectors.instability_ruled_out(list(sm.medians)[h:], list(lg.medians)[h:], cfg.instability),
             detectors.detect_instability(window)),
        ]
        for said_nothing, finding in checks:
            assert not (said_nothing and finding is not None), finding
            ruled_out += said_nothing
            scanned += finding is None
    assert ruled_out >= 0.5 * scanned  # not vacuous: most windows with nothing to find are ruled out


def test_the_grouped_straggler_references_are_the_per_rank_ones():
    rng = random.Random(3)
    for trial in range(30):
        ranks = rng.randint(4, 24)
        series: dict[int, list[Sample]] = {}
        for r in range(ranks):
            first, last = rng.randint(0, 30), rng.randint(60, 120)
            steps = sorted(rng.sample(range(first, last), rng.randint(1, last - first)))
            series[r] = [Sample(s, rng.choice([0.1, 0.2, 0.25, rng.uniform(0.05, 0.5)])) for s in steps]
        steps_of = {r: [s.step for s in ss] for r, ss in series.items()}
        memo: dict[tuple[int, int], list[float]] = {}
        for r, ss in series.items():
            recent = ss[-rng.choice([1, 5, 48]):]
            assert _references_grouped(series, steps_of, recent, memo) == _references(series, steps_of, r, recent)


# --------------------------------------------------------------------------- whole watch replays


@dataclass
class _Plain:
    """The signals as plain deques: evaluate_stage's full rescan of the records."""

    kind: str
    ranks: list[int]
    records: dict[int, Any] = field(default_factory=dict)
    handled_until: dict[str, int] = field(default_factory=dict)
    counter_series: dict[Any, Any] = field(default_factory=dict)
    heartbeat: dict[int, float] = field(default_factory=dict)
    paused_ranks: frozenset[int] = frozenset()
    last_step: int = -1
    started_at: float = 0.0
    resumed_at: float = 0.0
    steps: int = 10**9
    idle: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _T:
    rank: int


def _dump(findings: list[Any]) -> str:
    return json.dumps([f.to_dict() for f in findings], sort_keys=True, default=repr)


@pytest.mark.parametrize("seed,kind,nranks,rollbacks", [
    (1, "pretrain", 1, 0.0), (2, "pretrain", 1, 0.05), (3, "sft", 1, 0.03), (4, "pretrain", 5, 0.0),
    (5, "ppo", 1, 0.0), (6, "pretrain", 3, 0.05), (7, "dpo", 1, 0.0), (8, "pretrain", 1, 0.0),
])
def test_the_incremental_watch_finds_what_a_full_rescan_finds(seed, kind, nranks, rollbacks):
    rng = random.Random(seed)
    base = _windows(seed, n=10**6)[-1][:500 if nranks > 1 or kind == "ppo" else 900]
    plain = _Plain(kind=kind, ranks=list(range(nranks)))
    active = ActiveStage(run_id="r", name="s", kind=kind, index=0, steps=len(base),
                         targets=[_T(r) for r in range(nranks)])
    cfg = WatchConfig(sparse=seed == 8)
    slow = rng.randrange(nranks) if nranks > 1 else None
    i, cycles, findings = 0, 0, 0
    while i < len(base):
        every = rng.choice([1, 5, 10])
        for s in base[i:i + every]:
            for r in range(nranks):
                noise = random.Random(seed * 10_000 + r * 1_000 + s.step).gauss(0, 0.01)
                rec = {"step": s.step, "time": float(s.step), "loss": s.value * (1 + noise), "lr": 1e-3,
                       "grad_norm": 1.0 + abs(noise) * (40 if rng.random() < 0.003 else 1),
                       "step_seconds": 0.1 * (3 if r == slow and s.step > 500 else 1) + abs(noise)}
                if s.step % 25 == 0:
                    rec["val_loss"] = s.value + 0.1
                if rng.random() < 0.003:
                    rec[rng.choice(["loss", "grad_norm"])] = math.nan
                if rng.random() < 0.003:
                    rec["anomaly"] = rng.choice(["nonfinite_loss", "loss_spike"])
                if kind == "ppo":
                    # a stretch of negative KL: the PPO detectors find something to compare
                    kl = noise * 10 - (1.0 if 250 <= s.step < 300 else 0.0)
                    rec.update(kl=kl, reward_mean=s.step / 100, ppo_ratio_mean=1 + noise,
                               ppo_clip_fraction=0.1, policy_entropy=2.0, response_length=100.0, value_loss=1.0)
                if kind == "dpo":
                    rec.update(dpo_chosen_logprob=-1 - s.step / 1000, dpo_reward_margin=1 + noise)
                for buf in (plain.records.setdefault(r, deque(maxlen=400)), active.series(r)):
                    while buf and int(buf[-1]["step"]) >= s.step:
                        buf.pop()  # the workers went back (as ingest drops what they left behind)
                    buf.append(rec)
        i += every
        if rng.random() < rollbacks and i > 100:
            i -= rng.randint(5, 100)
            plain.handled_until.clear()
            active.went_back()
        now = float(base[min(i, len(base)) - 1].step)
        for sig in (plain, active):
            sig.heartbeat = {r: now for r in range(nranks)}
        want = evaluate_stage(plain, cfg, now=now)
        assert _dump(evaluate_stage(active, cfg, now=now)) == _dump(want), (cycles, _dump(want))
        assert _dump(evaluate_stage(active, cfg, now=now)) == _dump(want)  # unchanged buffers: the memo
        if cycles % 25 == 0:
            for k in ("loss_spike", "divergence", "nan"):
                a, b = alert_finding(plain, k, {}, cfg), alert_finding(active, k, {}, cfg)
                assert _dump([a] if a else []) == _dump([b] if b else [])
        for f in want:
            findings += 1
            plain.handled_until[f.kind] = active.handled_until[f.kind] = f.detected_at_step
        cycles += 1
    assert cycles > 50 and findings > 0, "both paths found something to compare"
