"""Issue 11, item 4: elastic restart, the size choice. A stage with `min_world_size` whose full
size cannot be placed takes the largest size the nodes' free resources hold (never below the
minimum), and gradient accumulation keeps each micro-step at the full-size share while the
global batch — the samples each step trains on — stays the same. Pure functions; no Ray."""
from __future__ import annotations

import pytest

from trainguard.workers.data import micro_batches, sample_indices
from trainguard.workers.group import accumulation_micro_batch, bundles_that_fit, elastic_sizes

CPU1 = {"CPU": 1.0}


@pytest.mark.parametrize(("strategy", "free", "expected"), [
    ("PACK", [{"CPU": 2.0}, {"CPU": 1.0}], 3),
    ("SPREAD", [{"CPU": 2.0}, {"CPU": 1.0}], 3),
    ("STRICT_PACK", [{"CPU": 2.0}, {"CPU": 1.0}], 2),  # one node holds them all
    ("STRICT_SPREAD", [{"CPU": 2.0}, {"CPU": 1.0}, {"CPU": 0.5}], 2),  # one per node, the 0.5 node holds none
    ("PACK", [], 0),  # no node alive
    ("PACK", [{"GPU": 4.0}], 0),  # no CPU at all
])
def test_bundles_that_fit_follow_the_placement_strategy(strategy, free, expected):
    assert bundles_that_fit(CPU1, strategy, free, limit=8) == expected


def test_bundles_that_fit_need_every_resource_of_the_bundle_and_stop_at_the_limit():
    gpu = {"GPU": 1.0, "CPU": 2.0}
    # 3 GPUs but CPUs for one bundle on the first node; 2 on the second
    assert bundles_that_fit(gpu, "PACK", [{"GPU": 3.0, "CPU": 2.5}, {"GPU": 2.0, "CPU": 8.0}], limit=8) == 3
    # fractional CPUs as Ray reports them (units of 1/10000): 1.5 / 0.5 is 3, not 2
    assert bundles_that_fit({"CPU": 0.5}, "PACK", [{"CPU": 1.4999999999}], limit=8) == 3
    assert bundles_that_fit(CPU1, "PACK", [{"CPU": 16.0}], limit=4) == 4
    # a bundle that asks for nothing fits anywhere, up to the limit
    assert bundles_that_fit({"CPU": 0.0}, "PACK", [{}], limit=4) == 4


@pytest.mark.parametrize(("world", "minimum", "fit", "expected"), [
    (4, 1, 2, [2, 1]),      # the largest that fits first; smaller ones if another run takes it meanwhile
    (4, 2, 3, [3, 2]),
    (4, 2, 4, [3, 2]),      # the full size just failed: never tried again here
    (4, 2, 1, [2]),         # not even the minimum fits now: wait for the minimum
    (4, 2, 0, [2]),
    (4, 3, None, [3]),      # free resources unknown: every smaller size, largest first
    (8, 5, None, [7, 6, 5]),
    (2, 1, 1, [1]),
])
def test_elastic_sizes_go_from_the_largest_fit_down_to_the_minimum(world, minimum, fit, expected):
    sizes = elastic_sizes(world, minimum, fit)
    assert sizes == expected
    assert all(minimum <= n < world for n in sizes) and sizes[-1] == minimum


def test_accumulation_keeps_the_full_size_share_per_micro_step():
    # 8 samples on 4 ranks: 2 each; on 2 ranks the share is 4, in micro-steps of 2
    assert accumulation_micro_batch("pretrain", 8, None, 4, 2) == 2
    assert accumulation_micro_batch("anneal", 10, None, 4, 1) == 3  # shares of 3 and 2 at full size: 3
    assert accumulation_micro_batch("pretrain", 8, None, 4, 4) is None  # full size: nothing changes
    assert accumulation_micro_batch("pretrain", 8, 1, 4, 2) is None  # the stage's own micro_batch_size stays
    assert accumulation_micro_batch("sft", 8, None, 4, 2) is None  # no accumulation for that kind
    assert accumulation_micro_batch("pretrain", 3, None, 4, 2) == 1  # fewer samples than ranks: 1 each at full size
    assert accumulation_micro_batch("pretrain", 2, None, 4, 2) is None  # one sample per rank either way


@pytest.mark.parametrize(("batch", "world", "placed"), [(8, 2, 1), (8, 4, 3), (12, 4, 2), (10, 4, 3)])
def test_a_shrunk_group_trains_on_the_same_global_samples_in_full_size_micro_steps(batch, world, placed):
    micro = accumulation_micro_batch("pretrain", batch, None, world, placed)
    full_share = max(len(sample_indices(0, r, world, batch)) for r in range(world))
    for b in (0, 1, 7):
        full = sorted(i for r in range(world) for i in sample_indices(b, r, world, batch))
        steps = [m for r in range(placed) for m in micro_batches(sample_indices(b, r, placed, batch), micro)]
        assert sorted(i for m in steps for i in m) == full == list(range(b * batch, (b + 1) * batch))
        assert max(len(m) for m in steps) <= full_share  # no micro-step larger than a full-size rank's step
