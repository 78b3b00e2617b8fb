"""Pure pieces of the worker runtime: LR schedules, skip list cursor, guard, control agreement."""
from __future__ import annotations

import math

import pytest

from trainguard.workers.contract import AnomalyKind, Control, ControlKind
from trainguard.workers.runtime.control import ControlInbox
from trainguard.workers.runtime.guard import Guard, SpikeScorer
from trainguard.workers.runtime.harness import DataCursor, anneal_lr, merge_ranges, schedule_lr


def test_schedule_warms_up_then_decays_to_min_ratio():
    lrs = [schedule_lr(s, base=1.0, total=100, warmup=10, min_ratio=0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exponential"])
def test_anneal_goes_from_start_to_final_then_holds(schedule):
    ov = {"start_step": 10, "start_lr": 1e-2, "final_lr": 1e-4, "steps": 20, "schedule": schedule}
    assert anneal_lr(10, ov) == pytest.approx(1e-2)
    assert anneal_lr(30, ov) == pytest.approx(1e-4)
    assert anneal_lr(50, ov) == pytest.approx(1e-4)
    mid = anneal_lr(20, ov)
    assert 1e-4 < mid < 1e-2


def test_cursor_skips_half_open_ranges():
    c = DataCursor()
    c.add_skip([[3, 5], [4, 7], [9, 10]])
    assert c.skip == [[3, 7], [9, 10]]
    assert [c.take() for _ in range(6)] == [0, 1, 2, 7, 8, 10]
    assert merge_ranges([[5, 5], [1, 2], [2, 3]]) == [[1, 3]]


def test_spike_scorer_flags_a_jump_and_not_noise():
    s = SpikeScorer(window=50, threshold=6.0)
    for i in range(40):
        _, spike = s.update(2.0 + 0.01 * ((i * 7) % 5))
        assert not spike
    score, spike = s.update(6.0)
    assert spike and score > 6.0
    # the spike does not enter the window: the next normal value scores normal
    assert not s.update(2.02)[1]


def test_guard_rejects_nonfinite_before_the_optimizer():
    g = Guard()
    v = g.check(float("nan"), 1.0)
    assert not v.apply_update and v.anomaly == AnomalyKind.NONFINITE_LOSS
    v = g.check(1.0, float("inf"))
    assert not v.apply_update and v.anomaly == AnomalyKind.NONFINITE_GRAD
    v = g.check(1.0, 1.0, any_rank_nonfinite=True)
    assert not v.apply_update and v.anomaly == AnomalyKind.NONFINITE_LOSS
    v = g.check(1.0, 1.0)
    assert v.apply_update and v.anomaly is None and math.isfinite(v.spike_score)


def test_control_agreement_applies_only_what_every_rank_has():
    a, b = ControlInbox(), ControlInbox()
    for seq in (1, 2, 3):
        a.put(Control(ControlKind.PAUSE, seq))
    b.put(Control(ControlKind.PAUSE, 1))
    b.put(Control(ControlKind.PAUSE, 3))  # 2 still in flight to b
    agreed = min(a.highest_contiguous(), b.highest_contiguous())
    assert agreed == 1
    assert [m.seq for m in a.take_upto(agreed)] == [1] == [m.seq for m in b.take_upto(agreed)]
    b.put(Control(ControlKind.RESUME, 2))
    agreed = min(a.highest_contiguous(), b.highest_contiguous())
    assert [m.seq for m in a.agree(lambda _: agreed)] == [2, 3] == [m.seq for m in b.agree(lambda _: agreed)]
    a.put(Control(ControlKind.STOP, 2))  # a duplicate of an applied seq is ignored
    assert a.highest_contiguous() == 3 and a.take_upto(3) == []


def test_a_sender_taking_over_numbers_its_controls_after_the_highest_seen():
    """A supervisor re-attaching to live workers starts from `highest_seen`: a STOP numbered
    from 1 again would be dropped as a duplicate of the old supervisor's first message."""
    inbox = ControlInbox()
    inbox.put(Control(ControlKind.ROLLBACK, 1, {}))
    inbox.take_upto(1)
    inbox.put(Control(ControlKind.PAUSE, 2))  # held, not yet agreed
    assert inbox.highest_seen() == 2
    inbox.put(Control(ControlKind.STOP, 1))  # what a sender starting from 0 would send
    assert inbox.highest_contiguous() == 2 and [m.kind for m in inbox.take_upto(2)] == [ControlKind.PAUSE]
    inbox.put(Control(ControlKind.STOP, inbox.highest_seen() + 1))
    assert [m.kind for m in inbox.take_upto(inbox.highest_contiguous())] == [ControlKind.STOP]


def test_controls_a_dead_sender_delivered_to_only_some_ranks_are_skipped_by_every_rank():
    """The old supervisor died while delivering seq 2: rank a has it, rank b not. No rank applied
    it (agreement needs all); without a skip b's gap would hold the agreement forever."""
    a, b = ControlInbox(), ControlInbox()
    for inbox in (a, b):
        inbox.put(Control(ControlKind.PAUSE, 1))
        inbox.take_upto(1)
    a.put(Control(ControlKind.ROLLBACK, 2, {}))
    assert min(a.highest_contiguous(), b.highest_contiguous()) == 1  # stuck until skipped
    top = max(a.highest_seen(), b.highest_seen())
    assert a.skip_to(top) == [2] and b.skip_to(top) == []
    for inbox in (a, b):
        inbox.put(Control(ControlKind.STOP, top + 1))
    agreed = min(a.highest_contiguous(), b.highest_contiguous())
    assert agreed == 3
    assert [m.kind for m in a.take_upto(agreed)] == [ControlKind.STOP] == [m.kind for m in b.take_upto(agreed)]
