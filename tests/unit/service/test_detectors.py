"""Detectors on simulated curves: they fire on real incidents and stay quiet on healthy noise."""
from __future__ import annotations

import math
import random

import pytest

from trainguard.service.domain import detectors as d
from trainguard.service.domain.series import Sample, Window
from tests.unit.service.curves import healthy_loss, inject_divergence, inject_spike

FA_SEEDS = range(5)
FA_STEPS = 20_000  # x 5 seeds = 100,000 healthy steps


def _all(detect, samples, **kw):
    """Every episode, resuming after each one's end (as service.analyze does)."""
    out, after = [], None
    while (f := detect(samples, after=after, **kw)) is not None:
        out.append(f)
        if f.evidence["end_step"] is None:
            break
        after = f.evidence["end_step"]
    return out


def flat(n: int, value: float = 2.0, sigma: float = 0.03, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    return [Sample(i, value * math.exp(rng.gauss(0, sigma))) for i in range(n)]


# --------------------------------------------------------------------------- loss spike


@pytest.mark.parametrize("factor", [2.0, 3.0, 5.0, 10.0])
@pytest.mark.parametrize("duration", [2, 3, 10, 100])
def test_loss_spike_found_at_its_first_step(factor, duration):
    xs = inject_spike(healthy_loss(7, 3000, sigma=0.05), 1500, duration, factor)
    f = d.detect_loss_spike(xs)
    assert f is not None and f.kind == "loss_spike"
    assert abs(f.onset_step - 1500) <= 2
    assert f.detected_at_step == f.onset_step + d.LossSpikeConfig().persistence - 1
    assert f.evidence["score"] >= f.evidence["threshold"]
    assert [1500, xs[1500].value] in f.evidence["window"]


def test_single_outlier_is_not_a_spike():
    xs = inject_spike(flat(300), 150, 1, 10.0)
    assert d.detect_loss_spike(xs) is None


def test_two_separate_outliers_are_not_a_spike():
    xs = inject_spike(inject_spike(flat(300), 150, 1, 5.0), 152, 1, 5.0)
    assert d.detect_loss_spike(xs) is None


def test_spike_episode_ends_when_loss_recovers_and_a_second_is_reported_after_it():
    xs = inject_spike(inject_spike(flat(600), 200, 5, 4.0), 400, 5, 4.0)
    first, second = _all(d.detect_loss_spike, xs)
    assert (first.onset_step, first.evidence["end_step"]) == (200, 204)
    assert second.onset_step == 400


def test_spike_still_going_at_window_end_has_no_end_step():
    f = d.detect_loss_spike(inject_spike(flat(300), 290, 10, 4.0))
    assert f is not None and f.onset_step == 290 and f.evidence["end_step"] is None


def test_spike_not_yet_persistent_is_not_reported():
    assert d.detect_loss_spike(inject_spike(flat(300), 299, 1, 4.0)) is None


def test_spike_on_sparse_scraped_window():
    xs = [s for s in inject_spike(flat(3000), 1500, 40, 3.0) if s.step % 10 == 0]
    f = d.detect_loss_spike(Window(samples=xs))
    assert f is not None and f.onset_step == 1500 and f.detected_at_step == 1510


def test_spike_ignores_nonfinite_values():
    xs = flat(300)
    xs[100] = Sample(100, math.nan)
    xs[101] = Sample(101, math.inf)
    assert d.detect_loss_spike(xs) is None


def test_no_spike_before_enough_history():
    xs = inject_spike(flat(40), 5, 3, 10.0)
    assert d.detect_loss_spike(xs) is None


def test_after_skips_earlier_episodes():
    xs = inject_spike(flat(600), 200, 5, 4.0)
    assert d.detect_loss_spike(xs, after=204) is None
    assert d.detect_loss_spike(xs, after=199).onset_step == 200


def test_spike_accepts_plain_tuples_and_unsorted_input():
    xs = [(s.step, s.value) for s in inject_spike(flat(300), 150, 3, 4.0)]
    random.Random(0).shuffle(xs)
    assert d.detect_loss_spike(xs).onset_step == 150


def test_evidence_is_json_serialisable():
    import json

    f = d.detect_loss_spike(inject_spike(flat(300), 150, 3, 4.0))
    json.dumps(f.to_dict(), allow_nan=False)


@pytest.mark.parametrize("kw", [{"window": 2}, {"min_history": 50}, {"persistence": 0}, {"min_ratio": 0.5}])
def test_spike_config_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        d.LossSpikeConfig(**kw)


# --------------------------------------------------------------------------- grad explosion, divergence


def test_grad_explosion_needs_a_large_persistent_excursion():
    g = flat(400, value=1.0, sigma=0.3, seed=3)
    assert d.detect_grad_explosion(inject_spike(g, 200, 2, 20.0)) is None  # two steps: not persistent
    f = d.detect_grad_explosion(inject_spike(g, 200, 5, 20.0))
    assert f is not None and f.kind == "grad_explosion" and f.onset_step == 200


def test_divergence_detects_sustained_rise_with_onset_before_detection():
    xs = inject_divergence(healthy_loss(3, 4000, sigma=0.05), 2000, rate=0.005)
    f = d.detect_divergence(xs)
    assert f is not None and f.kind == "divergence"
    assert 2000 <= f.onset_step <= 2060 and f.onset_step < f.detected_at_step
    assert f.evidence["rolling_median"] > f.evidence["threshold"]


def test_divergence_ignores_a_short_spike():
    assert d.detect_divergence(inject_spike(flat(1000), 500, 15, 5.0)) is None


def test_divergence_loss_near_zero_uses_absolute_floor():
    xs = [Sample(i, 0.01 * math.exp(random.Random(i).gauss(0, 0.3))) for i in range(1000)]
    assert d.detect_divergence(xs) is None


# --------------------------------------------------------------------------- false alarms


@pytest.mark.parametrize("seed", FA_SEEDS)
def test_no_false_alarms_on_healthy_curves(seed):
    xs = healthy_loss(seed, FA_STEPS)
    assert _all(d.detect_loss_spike, xs) == []
    assert _all(d.detect_divergence, xs) == []


# --------------------------------------------------------------------------- nan


def test_nan_in_loss():
    xs = flat(100)
    xs[60] = Sample(60, math.nan)
    f = d.detect_nan(xs)
    assert f is not None and f.kind == "nan" and f.onset_step == 60
    assert f.evidence["window"] == [[60, "nan"]]


def test_inf_grad_norm():
    g = [Sample(i, math.inf if i == 30 else 1.0) for i in range(50)]
    assert d.detect_nan(grad_norm=g).onset_step == 30


def test_nan_from_anomaly_counter_rise_between_scrapes():
    counter = [Sample(0, 0), Sample(10, 0), Sample(20, 2), Sample(30, 2)]
    f = d.detect_nan(anomalies={"nonfinite_loss": counter, "loss_spike": [Sample(0, 0), Sample(10, 5)]})
    assert f is not None and f.onset_step == 11 and f.detected_at_step == 20


def test_counter_reset_after_restart_is_not_an_increase():
    counter = [Sample(0, 3), Sample(10, 3), Sample(11, 0), Sample(20, 0)]
    assert d.detect_nan(anomalies={"nonfinite_grad": counter}) is None


def test_nan_min_count_tolerates_isolated_steps():
    xs = flat(100)
    xs[60] = Sample(60, math.nan)
    assert d.detect_nan(xs, cfg=d.NanConfig(min_count=2)) is None
    xs[70] = Sample(70, math.nan)
    assert d.detect_nan(xs, cfg=d.NanConfig(min_count=2)).detected_at_step == 70


def test_healthy_run_has_no_nan():
    assert d.detect_nan(flat(100), flat(100), {"nonfinite_loss": [Sample(0, 0), Sample(50, 0)]}) is None


# --------------------------------------------------------------------------- stage-specific


def _sft(overfit: bool) -> tuple[list[Sample], list[Sample]]:
    train = [Sample(i, 2.0 * (i + 10) ** -0.2) for i in range(0, 1000)]
    val = []
    for k, step in enumerate(range(0, 1000, 50)):
        v = 2.2 * (step + 10) ** -0.15
        if overfit and step > 500:
            v = 2.2 * 510**-0.15 * (1 + 0.03 * (step - 500) / 50)
        val.append(Sample(step, v))
    return val, train


def test_val_divergence_when_val_rises_and_train_falls():
    val, train = _sft(overfit=True)
    f = d.detect_val_divergence(val, train)
    assert f is not None and f.kind == "val_divergence"
    assert f.evidence["best_step"] == 500 and f.onset_step > 500
    assert f.evidence["train_loss_now"] < f.evidence["train_loss_at_best"]


def test_val_divergence_quiet_when_both_fall():
    val, train = _sft(overfit=False)
    assert d.detect_val_divergence(val, train) is None


def test_val_divergence_quiet_when_train_rises_too():
    val, _ = _sft(overfit=True)
    train = [Sample(i, 1.0 + i / 1000) for i in range(1000)]
    assert d.detect_val_divergence(val, train) is None


def _ppo(hack: bool):
    rng = random.Random(1)
    reward, kl = [], []
    for i in range(300):
        r = 0.5 + 0.001 * i + rng.gauss(0, 0.02)
        k = 0.4 + rng.gauss(0, 0.05)
        if hack and i >= 150:
            r += 0.01 * (i - 150)
            k = 1.5 + 0.01 * (i - 150)
        reward.append(Sample(i, r))
        kl.append(Sample(i, k))
    return reward, kl


def test_reward_hacking_when_kl_blows_past_target_and_reward_climbs():
    reward, kl = _ppo(hack=True)
    f = d.detect_reward_hacking(reward, kl, 0.5)
    assert f is not None and f.kind == "reward_hacking" and f.onset_step == 150
    assert f.detected_at_step == 150 + d.RewardHackingConfig().persistence - 1


def test_reward_hacking_target_series_and_no_target():
    reward, kl = _ppo(hack=True)
    assert d.detect_reward_hacking(reward, kl, [Sample(0, 0.5)]).onset_step == 150
    assert d.detect_reward_hacking(reward, kl, None) is None


def test_no_reward_hacking_within_budget():
    reward, kl = _ppo(hack=False)
    assert d.detect_reward_hacking(reward, kl, 0.5) is None


def test_no_reward_hacking_when_reward_falls():
    _, kl = _ppo(hack=True)
    reward = [Sample(i, 1.0 - 0.003 * i) for i in range(300)]
    assert d.detect_reward_hacking(reward, kl, 0.5) is None


def _dpo(collapse: bool):
    chosen, margin = [], []
    for i in range(200):
        c = -30.0 - 0.01 * i
        if collapse and i >= 100:
            c -= 0.5 * (i - 100)
        chosen.append(Sample(i, c))
        margin.append(Sample(i, 0.02 * i))
    return chosen, margin


def test_dpo_collapse_when_chosen_logprob_falls_far_and_margin_grows():
    chosen, margin = _dpo(collapse=True)
    f = d.detect_dpo_collapse(chosen, margin)
    assert f is not None and f.kind == "dpo_collapse" and 100 <= f.onset_step <= f.detected_at_step


def test_no_dpo_collapse_on_slow_drift():
    chosen, margin = _dpo(collapse=False)
    assert d.detect_dpo_collapse(chosen, margin) is None


# --------------------------------------------------------------------------- liveness and hardware


def test_hang_after_timeout_with_injected_clock():
    hb = {0: Sample(120, 1000.0), 1: Sample(118, 1000.0 - 60)}
    cfg = d.HangConfig(timeout_s=120.0)
    assert d.detect_hang(hb, now=1050.0, cfg=cfg) is None
    f = d.detect_hang(hb, now=1100.0, cfg=cfg)
    assert f is not None and f.kind == "hang" and f.evidence["ranks"] == [1] and f.onset_step == 118


def test_hang_timeout_scales_with_slow_steps():
    hb = {0: Sample(5, 0.0)}
    assert d.detect_hang(hb, now=200.0, step_seconds=30.0) is None  # 10 steps of 30 s = 300 s
    assert d.detect_hang(hb, now=301.0, step_seconds=30.0) is not None


def test_straggler_one_slow_rank():
    times = {r: [Sample(i, 0.10 + 0.005 * random.Random(r * 1000 + i).random()) for i in range(40)] for r in range(4)}
    assert d.detect_straggler(times) is None
    times[2] = [Sample(i, 0.1 if i < 15 else 0.4) for i in range(40)]  # median: most of the window
    f = d.detect_straggler(times)
    assert f is not None and f.evidence["rank"] == 2 and f.onset_step == 15


def test_straggler_needs_two_ranks():
    assert d.detect_straggler({0: [Sample(i, 1.0) for i in range(40)]}) is None


@pytest.mark.parametrize(
    "status, lost",
    [
        ({"state": "running", "ranks": [{"rank": 0, "step": 10, "alive": True}, {"rank": 1, "step": 9, "alive": False, "error": "exit 1"}]}, [1]),
        ({"state": "failed", "failed_rank": 0, "ranks": [{"rank": 0, "step": 4, "alive": True}]}, [0]),
        ({"state": "finished", "ranks": [{"rank": 0, "step": 50, "alive": False, "state": "finished"}]}, None),
        ({"state": "running", "ranks": [{"rank": 0, "step": 5, "alive": True}]}, None),
    ],
)
def test_worker_lost(status, lost):
    f = d.detect_worker_lost(status)
    assert (f.evidence["ranks"] if f else None) == lost


def test_a_rank_dead_with_its_node_is_a_node_loss_naming_the_node():
    status = {"state": "failed", "ranks": [
        {"rank": 0, "step": 12, "alive": True, "node": "n-head", "node_alive": True},
        {"rank": 1, "step": 11, "alive": False, "error": "died", "node": "n-worker2", "node_alive": False}]}
    f = d.detect_worker_lost(status)
    assert f is not None and f.kind == "node_lost" and f.evidence["nodes"] == ["n-worker2"] and f.evidence["ranks"] == [1]
    # the process died, its node lives (or is unknown): a worker loss
    status["ranks"][1]["node_alive"] = True
    assert d.detect_worker_lost(status).kind == "worker_lost"
    del status["ranks"][1]["node_alive"]
    assert d.detect_worker_lost(status).kind == "worker_lost"


def test_gpu_fault_when_xid_counter_rises():
    counters = {"xid/rank0": [Sample(0, 0), Sample(10, 0), Sample(20, 1)], "ecc/rank0": [Sample(0, 0), Sample(20, 0)]}
    f = d.detect_gpu_fault(counters)
    assert f is not None and f.kind == "gpu_fault" and f.onset_step == 11 and f.evidence["counters"] == ["xid/rank0"]
    assert d.detect_gpu_fault({"xid": [Sample(0, 2), Sample(10, 2)]}) is None


def test_incident_kind_values():
    assert {k.value for k in d.IncidentKind} == {
        "loss_spike", "divergence", "nan", "grad_explosion", "val_divergence", "reward_hacking",
        "dpo_collapse", "hang", "straggler", "worker_lost", "gpu_fault", "instability", "node_lost",
        "insufficient_resources", "policy_ratio", "negative_kl", "entropy_collapse", "response_length",
        "value_loss_explosion",
    }


@pytest.mark.parametrize("seed", range(10))
def test_no_val_divergence_on_healthy_noisy_evaluations(seed):
    rng = random.Random(seed)
    train = healthy_loss(seed, 5000, sigma=0.05)
    val = [Sample(s.step, 1.1 * (2.0 + 3.0 * (s.step + 50) ** -0.4) * math.exp(rng.gauss(0, 0.01))) for s in train[::100]]
    assert d.detect_val_divergence(val, train) is None


def test_injected_spikes_detection_rate_and_onset_error():
    """Spikes of 2-10x lasting 2-200 steps at random places on noisy curves: found, onset within 2 steps."""
    ok = total = 0
    for seed in range(10):
        rng = random.Random(1000 + seed)
        xs = healthy_loss(seed, 4000)
        for factor in (2.0, 3.0, 5.0, 10.0):
            for duration in (2, 3, 5, 20, 200):
                at = rng.randint(500, 3500)
                f = d.detect_loss_spike(inject_spike(xs, at, duration, factor))
                total += 1
                ok += f is not None and abs(f.onset_step - at) <= 2
    assert ok / total >= 0.98, f"{ok}/{total}"
