"""Recovery policy scenarios (DESIGN.md "Recovery semantics")."""
from __future__ import annotations

import math

import pytest

from trainguard.service.domain.detectors import Finding
from trainguard.service.domain.policy import (
    in_effect,
    operator_rollback,
    recovery_lr,
    Action,
    Attempt,
    CheckpointInfo,
    RecoveryConfig,
    RunSnapshot,
    batch_at_step,
    decide,
    dedup_key,
)

CFG = RecoveryConfig(margin=10, skip_after=20, lr_backoff=0.5, max_attempts=3, widen_factor=2)


def ck(step: int, **kw) -> CheckpointInfo:
    return CheckpointInfo(step=step, batch_cursor=kw.pop("batch_cursor", step), **kw)


def incident(kind: str, onset: int) -> Finding:
    return Finding(kind, onset, onset + 1, {})


CKS = [ck(20), ck(40), ck(60), ck(80), ck(100)]


@pytest.mark.parametrize("kind", ["loss_spike", "divergence", "nan", "grad_explosion"])
def test_rollback_target_precedes_onset_by_at_least_margin(kind):
    dec = decide(incident(kind, 95), RunSnapshot(checkpoints=CKS), CFG)
    assert dec.action is Action.ROLLBACK
    assert dec.checkpoint_step == 80  # 80 <= 95 - 10; 100 is after the onset
    assert dec.skip == [(80, 95 + 20 + 1)]
    assert dec.lr_multiplier == 0.5 and dec.lr_target == 0.5
    assert dec.attempt == 1 and dec.source == "spike"
    assert "attempt 1/3" in dec.reason and "spike budget 1/10" in dec.reason


def test_checkpoint_exactly_margin_before_onset_is_used():
    assert decide(incident("loss_spike", 90), RunSnapshot(checkpoints=CKS), CFG).checkpoint_step == 80
    assert decide(incident("loss_spike", 89), RunSnapshot(checkpoints=CKS), CFG).checkpoint_step == 60


def test_checkpoint_written_during_the_spike_is_never_chosen():
    cfg = RecoveryConfig(margin=0)
    dec = decide(incident("loss_spike", 100), RunSnapshot(checkpoints=CKS + [ck(120)]), cfg)
    assert dec.checkpoint_step == 80  # 100 (== onset) and 120 were saved while it was under way


@pytest.mark.parametrize(
    "bad",
    [
        ck(80, healthy=False),
        ck(80, verified=False),
        ck(80, anomalies_in_window=2),
        ck(80, metrics={"train_loss": math.nan}),
    ],
)
def test_unhealthy_or_unverified_checkpoint_is_skipped(bad):
    dec = decide(incident("loss_spike", 95), RunSnapshot(checkpoints=[ck(20), ck(40), ck(60), bad]), CFG)
    assert dec.checkpoint_step == 60


def test_checkpoint_spike_score_checked_when_configured():
    cks = [ck(60), ck(80, metrics={"spike_score": 9.0})]
    assert decide(incident("loss_spike", 95), RunSnapshot(checkpoints=cks), CFG).checkpoint_step == 80
    cfg = RecoveryConfig(checkpoint_max_spike_score=6.0)
    assert decide(incident("loss_spike", 95), RunSnapshot(checkpoints=cks), cfg).checkpoint_step == 60


def test_skip_uses_batch_cursors_not_steps():
    # earlier skips moved the data cursor ahead of the step count
    cks = [ck(80, batch_cursor=130)]
    snap = RunSnapshot(checkpoints=cks, batch_index_at={95: 145})
    assert decide(incident("loss_spike", 95), snap, CFG).skip == [(130, 145 + 21)]


def test_onset_batch_walked_over_the_skip_list_when_history_is_missing():
    snap = RunSnapshot(checkpoints=[ck(80, batch_cursor=80)], skip=[(85, 90)])
    assert batch_at_step(95, snap, snap.checkpoints[0]) == 100  # 80..84, then 90..99 -> step 95 takes 100
    assert decide(incident("loss_spike", 95), snap, CFG).skip == [(80, 121)]


def test_same_region_again_widens_skip_and_lowers_lr():
    first = Attempt(kind="loss_spike", onset_step=95, checkpoint_step=80, lr_multiplier=0.5)
    dec = decide(incident("loss_spike", 97), RunSnapshot(checkpoints=CKS, attempts=[first]), CFG)
    assert dec.action is Action.ROLLBACK and dec.attempt == 2
    assert dec.skip == [(80, 97 + 40 + 1)]  # skip_after x widen_factor
    assert dec.lr_target == 0.25 and dec.lr_multiplier == 0.25  # the checkpoint still has 1.0

    second = Attempt(kind="loss_spike", onset_step=97, checkpoint_step=80, lr_multiplier=0.25)
    dec = decide(incident("loss_spike", 96), RunSnapshot(checkpoints=CKS, attempts=[first, second]), CFG)
    assert dec.attempt == 3 and dec.skip == [(80, 96 + 80 + 1)] and dec.lr_target == 0.125


def test_lr_factor_is_relative_to_the_checkpoint_multiplier():
    first = Attempt(kind="loss_spike", onset_step=95, lr_multiplier=0.5)
    cks = [ck(60), ck(85, lr_multiplier=0.5)]
    dec = decide(incident("loss_spike", 100), RunSnapshot(checkpoints=cks, attempts=[first]), CFG)
    assert dec.checkpoint_step == 85 and dec.lr_target == 0.25 and dec.lr_multiplier == 0.5


def test_needs_attention_after_max_attempts_in_region():
    attempts = [Attempt(kind="loss_spike", onset_step=95 + i, lr_multiplier=0.5 ** (i + 1)) for i in range(3)]
    dec = decide(incident("loss_spike", 96), RunSnapshot(checkpoints=CKS, attempts=attempts), CFG)
    assert dec.action is Action.NEEDS_ATTENTION and "3 rollbacks" in dec.reason and "limit 3" in dec.reason


def test_attempts_in_another_region_do_not_count():
    attempts = [Attempt(kind="loss_spike", onset_step=500 + i) for i in range(3)]
    dec = decide(incident("loss_spike", 95), RunSnapshot(checkpoints=CKS, attempts=attempts), CFG)
    assert dec.action is Action.ROLLBACK and dec.attempt == 1 and dec.lr_target == 0.5


@pytest.mark.parametrize("kind, source", [("worker_lost", "worker"), ("hang", "hang"), ("gpu_fault", "gpu")])
def test_restart_for_hardware_and_liveness_faults(kind, source):
    dec = decide(incident(kind, 95), RunSnapshot(checkpoints=CKS), CFG)
    assert dec.action is Action.RESTART and dec.skip == [] and dec.lr_multiplier == 1.0
    assert dec.source == source
    # a lost or hung worker resumes from the newest good checkpoint; a GPU fault from one before it
    assert dec.checkpoint_step == (80 if kind == "gpu_fault" else 100)


@pytest.mark.parametrize("kind", ["loss_spike", "worker_lost"])
def test_no_checkpoint_restarts_stage_from_its_input(kind):
    dec = decide(incident(kind, 15), RunSnapshot(checkpoints=[ck(20, verified=False)]), CFG)
    assert dec.checkpoint_step is None and "stage input" in dec.reason
    if kind == "loss_spike":
        assert dec.action is Action.ROLLBACK and dec.skip == [(0, 15 + 21)]
    else:
        assert dec.action is Action.RESTART


@pytest.mark.parametrize(
    "kind, budgets, used, action",
    [
        ("loss_spike", {"spike": 2}, {"spike": 2}, Action.NEEDS_ATTENTION),
        ("loss_spike", {"spike": 2}, {"spike": 1}, Action.ROLLBACK),
        ("loss_spike", {"spike": -1}, {"spike": 10_000}, Action.ROLLBACK),
        ("worker_lost", {"worker": 0}, {}, Action.NEEDS_ATTENTION),
        ("worker_lost", {"worker": -1}, {"worker": 99}, Action.RESTART),
        ("hang", {"hang": 1}, {"hang": 1, "spike": 0}, Action.NEEDS_ATTENTION),
        ("gpu_fault", {"gpu": 3}, {"spike": 50}, Action.RESTART),  # budgets are per source
    ],
)
def test_budgets_per_source_with_unlimited(kind, budgets, used, action):
    cfg = RecoveryConfig(budgets=budgets)
    dec = decide(incident(kind, 95), RunSnapshot(checkpoints=CKS, budgets_used=used), cfg)
    assert dec.action is action
    if action is Action.NEEDS_ATTENTION:
        assert "budget exhausted" in dec.reason
    elif budgets.get(dec.source) == -1:
        assert "unlimited" in dec.reason


def test_reward_hacking_and_dpo_collapse_roll_back_with_lr_backoff_and_no_skip():
    for kind in ("reward_hacking", "dpo_collapse"):
        dec = decide(incident(kind, 95), RunSnapshot(checkpoints=CKS), CFG)
        assert dec.action is Action.ROLLBACK and dec.skip == [] and dec.lr_multiplier == 0.5
        assert dec.checkpoint_step == 80


def test_straggler_notifies():
    dec = decide(incident("straggler", 95), RunSnapshot(checkpoints=CKS), CFG)
    assert dec.action is Action.NOTIFY and dec.source is None


def test_val_divergence_notifies_and_names_best_checkpoint():
    cks = [ck(20, metrics={"val_loss": 2.0}), ck(40, metrics={"val_loss": 1.5}), ck(60, metrics={"val_loss": 1.7})]
    dec = decide(incident("val_divergence", 55), RunSnapshot(checkpoints=cks), CFG)
    assert dec.action is Action.NOTIFY and dec.checkpoint_step == 40 and "keep checkpoint 40" in dec.reason


def test_operator_rollback_goes_to_the_named_checkpoint_skips_to_now_and_backs_off_from_its_lr():
    cks = [ck(20), ck(40, lr_multiplier=0.5), ck(60)]
    dec = operator_rollback(cks, requested_step=40, skip=True, factor=None, last_step=70, next_batch=75, cfg=CFG)
    assert (dec.action, dec.checkpoint_step, dec.skip) == (Action.ROLLBACK, 40, [(40, 75)])
    assert dec.lr_target == 0.25 and dec.lr_multiplier == 0.5  # 0.5 stored x backoff 0.5; factor on the stored
    plain = operator_rollback(cks, requested_step=None, skip=False, factor=1.0, last_step=70, next_batch=75, cfg=CFG)
    assert (plain.checkpoint_step, plain.skip, plain.lr_target) == (60, [], 1.0)
    none = operator_rollback([], requested_step=None, skip=True, factor=None, last_step=5, next_batch=6, cfg=CFG)
    assert none.checkpoint_step is None and none.skip == [] and "stage input" in none.reason


def test_recovery_lr_compounds_over_the_region_and_in_effect_carries_the_newest():
    assert recovery_lr(1.0, 0.5) == (0.5, 0.5)
    assert recovery_lr(0.5, 0.5, [0.25]) == (0.125, 0.25)  # below the lowest multiplier the region reached
    attempts = [Attempt(kind="loss_spike", onset_step=50, action="rollback", lr_multiplier=0.5, skip=[(40, 71)]),
                Attempt(kind="hang", onset_step=60, action="restart", lr_multiplier=1.0),
                Attempt(kind="nan", onset_step=90, action="rollback", lr_multiplier=0.25, skip=[(80, 111)])]
    assert in_effect(attempts) == ([(40, 71), (80, 111)], 0.25)
    assert in_effect([]) == ([], 1.0)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown incident kind"):
        decide(incident("cosmic_ray", 1), RunSnapshot(), CFG)


@pytest.mark.parametrize(
    "kw",
    [{"margin": -1}, {"lr_backoff": 0}, {"lr_backoff": 1.5}, {"max_attempts": 0}, {"budgets": {"spike": -2}}, {"budgets": {"disk": 1}}],
)
def test_config_validation(kw):
    with pytest.raises(ValueError):
        RecoveryConfig(**kw)


def test_dedup_key_buckets_onsets_and_separates_generations():
    assert dedup_key("r1", "pretrain", "loss_spike", 101) == dedup_key("r1", "pretrain", "loss_spike", 149)
    assert dedup_key("r1", "pretrain", "loss_spike", 101) != dedup_key("r1", "pretrain", "loss_spike", 151)
    assert dedup_key("r1", "pretrain", "loss_spike", 101, generation=1) != dedup_key("r1", "pretrain", "loss_spike", 101)
    assert dedup_key("r1", "pretrain", "nan", 7, bucket=10) == "r1/pretrain/nan/g0/b0"
    with pytest.raises(ValueError):
        dedup_key("r", "s", "nan", 1, bucket=0)


def test_decision_to_dict_is_plain():
    import json

    json.dumps(decide(incident("loss_spike", 95), RunSnapshot(checkpoints=CKS), CFG).to_dict())
