"""PPO update-health detectors (service/domain/detectors/post_training.py) on synthetic series:
quiet on healthy PPO-shaped series (noise, the per-rollout repetition of rollout-level values,
a rollout's first minibatch at ratio 1, a value loss falling from its start), firing on each
failure; plus their wiring: the watch's evaluation, the recovery policy and `trainguard analyze`.

The real PPO and DPO stages pushed into each failure are in tests/unit/workers/test_stages.py."""
from __future__ import annotations

import json
import math
import random

import pytest

from trainguard.service.analyze import analyze_file
from trainguard.service.domain import detectors as d
from trainguard.service.domain.evaluate import WatchConfig, evaluate_stage
from trainguard.service.domain.policy import Action, RunSnapshot, decide, CheckpointInfo
from trainguard.service.domain.series import Sample

from tests.support import StageSignalsStub

STEPS_PER_ROLLOUT = 4  # the PPO stage's defaults: 2 epochs x 2 minibatches


def series(values) -> list[Sample]:
    return [Sample(i + 1, float(v)) for i, v in enumerate(values)]


def per_rollout(values_per_rollout) -> list[float]:
    """A rollout-level signal as the stage exports it: repeated on every step of its rollout."""
    return [v for v in values_per_rollout for _ in range(STEPS_PER_ROLLOUT)]


def healthy_ratio(rng: random.Random, n: int) -> tuple[list[float], list[float]]:
    ratio, clip = [], []
    for i in range(n):
        first = i % STEPS_PER_ROLLOUT == 0  # nothing has moved yet: ratio 1, nothing clipped
        ratio.append(1.0 if first else 1.0 + rng.gauss(0, 0.03))
        clip.append(0.0 if first else min(1.0, abs(rng.gauss(0.05, 0.15))))  # single minibatches up to ~0.5
    return ratio, clip


# --------------------------------------------------------------------------- policy ratio


@pytest.mark.parametrize("seed", range(5))
def test_no_policy_ratio_incident_on_healthy_updates(seed):
    ratio, clip = healthy_ratio(random.Random(seed), 2000)
    assert d.detect_policy_ratio(series(ratio), series(clip)) is None


def test_policy_ratio_fires_when_most_tokens_leave_the_clip_range():
    ratio, clip = healthy_ratio(random.Random(0), 200)
    clip[100:] = [0.0 if i % STEPS_PER_ROLLOUT == 0 else 0.8 for i in range(100, 200)]
    f = d.detect_policy_ratio(series(ratio), series(clip))
    assert f is not None and f.kind == "policy_ratio" and f.evidence["signal"] == "clip_fraction"
    assert 100 <= f.onset_step <= 110 and f.detected_at_step - f.onset_step == 3


def test_policy_ratio_fires_on_a_mean_ratio_above_2_and_reports_after_the_episode():
    ratio, clip = healthy_ratio(random.Random(1), 300)
    ratio[100:140] = [3.0] * 40
    f = d.detect_policy_ratio(series(ratio), series(clip))
    assert f is not None and f.evidence["signal"] == "ratio_mean" and f.evidence["threshold"] == 2.0
    assert f.evidence["end_step"] is not None and f.evidence["end_step"] > 140
    assert d.detect_policy_ratio(series(ratio), series(clip), after=f.evidence["end_step"]) is None


# --------------------------------------------------------------------------- negative KL


@pytest.mark.parametrize("seed", range(5))
def test_no_negative_kl_on_a_healthy_estimate_scattered_around_its_value(seed):
    rng = random.Random(seed)
    # next to the reference at first (estimates around 0, some below -0.1), then ~0.5
    kl = per_rollout([rng.gauss(0.02 * min(i, 25), 0.15) for i in range(500)])
    assert d.detect_negative_kl(series(kl)) is None


def test_negative_kl_fires_when_the_estimate_stays_below_zero():
    kl = per_rollout([0.0, 0.3, 0.4] + [-0.3] * 10)
    f = d.detect_negative_kl(series(kl))
    assert f is not None and f.kind == "negative_kl" and f.evidence["kl_median"] < -0.1
    assert f.onset_step == 13  # the first negative sample


# --------------------------------------------------------------------------- entropy collapse


@pytest.mark.parametrize("seed", range(5))
def test_no_entropy_collapse_on_a_slow_healthy_decline(seed):
    rng = random.Random(seed)
    ent = [3.3 * (1 - 0.4 * i / 3000) + rng.gauss(0, 0.1) for i in range(3000)]  # loses 40% over the run
    assert d.detect_entropy_collapse(series(ent)) is None


def test_entropy_collapse_fires_below_40_percent_of_the_start():
    ent = [3.3] * 40 + [3.3 * 0.9**k for k in range(1, 40)]
    f = d.detect_entropy_collapse(series(ent))
    assert f is not None and f.kind == "entropy_collapse" and f.evidence["score"] < 0.4
    assert f.evidence["entropy_start"] == pytest.approx(3.3)


# --------------------------------------------------------------------------- response length


@pytest.mark.parametrize("seed", range(5))
def test_no_response_length_incident_on_healthy_lengths(seed):
    rng = random.Random(seed)
    length = per_rollout([min(16.0, max(1.0, rng.gauss(14.5, 1.0) + i / 200)) for i in range(500)])
    assert d.detect_response_length(series(length)) is None


@pytest.mark.parametrize("target, direction", [(3.0, "collapse"), (40.0, "explosion")])
def test_response_length_collapse_and_explosion(target, direction):
    length = per_rollout([15.0] * 5 + [15.0 + (target - 15.0) * k / 5 for k in range(1, 6)] + [target] * 10)
    f = d.detect_response_length(series(length))
    assert f is not None and f.kind == "response_length" and f.evidence["direction"] == direction


# --------------------------------------------------------------------------- value loss


@pytest.mark.parametrize("seed", range(5))
def test_no_value_loss_explosion_while_the_critic_learns(seed):
    rng = random.Random(seed)
    # falls 20x from its start, with noise and the per-rollout sawtooth (fresh rollouts fit worse)
    vl = [0.45 * math.exp(-i / 300) * (1.6 if i % STEPS_PER_ROLLOUT == 0 else 1.0) * math.exp(rng.gauss(0, 0.4)) + 0.02
          for i in range(3000)]
    assert d.detect_value_loss_explosion(series(vl)) is None


def test_value_loss_explosion_fires_on_a_blow_up_and_on_non_finite_values():
    vl = [0.5 * 0.98**i for i in range(100)] + [0.5 * 1.3**k for k in range(40)]
    f = d.detect_value_loss_explosion(series(vl))
    assert f is not None and f.kind == "value_loss_explosion" and f.onset_step > 100
    nan = [0.5] * 20 + [float("nan")] * 6
    g = d.detect_value_loss_explosion(series(nan))
    assert g is not None and g.onset_step == 21 and g.evidence["value_loss_median"] == "inf"


# --------------------------------------------------------------------------- wiring


def _records(n: int, **cols) -> list[dict]:
    return [{"step": i + 1, "loss": 1.5, "kl_target": 0.5, **{k: v[i] for k, v in cols.items()}} for i in range(n)]


def _broken_ppo(n: int = 120) -> dict[str, list[float]]:
    ratio, clip = healthy_ratio(random.Random(3), n)
    half = n // 2
    return {
        "ppo_ratio_mean": ratio[:half] + [3.0] * (n - half),
        "ppo_clip_fraction": clip,
        "kl": [0.2] * half + [-0.5] * (n - half),
        "reward_mean": [1.0] * n,
        "policy_entropy": [3.0] * half + [0.3] * (n - half),
        "response_length": [15.0] * half + [2.0] * (n - half),
        "value_loss": [0.5] * half + [50.0] * (n - half),
    }


def test_the_watch_evaluates_every_ppo_detector_on_rank_0_and_reports_each_kind_once():
    found = evaluate_stage(StageSignalsStub("ppo", _records(120, **_broken_ppo())), WatchConfig(), now=0.0)
    kinds = [f.kind for f in found]
    assert {"policy_ratio", "negative_kl", "entropy_collapse", "response_length", "value_loss_explosion"} <= set(kinds)
    assert len(kinds) == len(set(kinds))
    healthy = {k: v[:60] for k, v in _broken_ppo().items()}
    assert evaluate_stage(StageSignalsStub("ppo", _records(60, **healthy)), WatchConfig(), now=0.0) == []


def test_the_new_kinds_get_their_policy_actions():
    cks = [CheckpointInfo(step=s, batch_cursor=s) for s in (20, 40, 60, 80)]
    for kind in ("policy_ratio", "entropy_collapse", "response_length", "value_loss_explosion"):
        dec = decide(d.Finding(kind, 95, 95), RunSnapshot(checkpoints=cks))
        assert dec.action is Action.ROLLBACK and dec.skip == [] and dec.lr_multiplier == 0.5, kind
        assert dec.checkpoint_step == 80 and dec.source == "spike"
    dec = decide(d.Finding("negative_kl", 95, 95), RunSnapshot(checkpoints=cks))
    assert dec.action is Action.NOTIFY and dec.source is None and "sampl" in dec.reason


def test_analyze_reports_the_new_kinds_from_a_jsonl_history(tmp_path):
    path = tmp_path / "ppo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(120, **_broken_ppo())))
    kinds = {f["kind"] for f in analyze_file(path)}
    assert {"policy_ratio", "negative_kl", "entropy_collapse", "response_length", "value_loss_explosion"} <= kinds


def test_analyze_maps_trl_style_column_names(tmp_path):
    cols = _broken_ppo()
    names = {"ppo_ratio_mean": "val/ratio", "ppo_clip_fraction": "policy/clipfrac_avg", "kl": "objective/kl",
             "policy_entropy": "objective/entropy", "value_loss": "loss/value_avg",
             "response_length": "response_length", "reward_mean": "objective/scores"}
    path = tmp_path / "trl.csv"
    lines = ["step," + ",".join(names[k] for k in names)]
    lines += [f"{i + 1}," + ",".join(str(cols[k][i]) for k in names) for i in range(120)]
    path.write_text("\n".join(lines) + "\n")
    kinds = {f["kind"] for f in analyze_file(path)}
    assert {"policy_ratio", "negative_kl", "entropy_collapse", "value_loss_explosion"} <= kinds
