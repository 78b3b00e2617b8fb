"""Data by global sample index: the same samples whatever the world size (workers/data.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from trainguard.workers import data
from trainguard.workers.data import get_mixture, local_share, micro_batches, sample_indices
from trainguard.workers.model import lm_loss
from trainguard.workers.runtime.harness import make_context
from trainguard.workers.spec import SpecError, parse_pipeline
from trainguard.workers.stages.pretrain import PretrainStage

MIX = {"web": 0.6, "curated": 0.4}


def _spec(**stage):
    st = {"name": "pretrain", "kind": "pretrain", "steps": 10, "batch_size": 8, "mixture": MIX}
    st.update(stage)
    return parse_pipeline({"name": "g", "seed": 5, "model": {"n_layer": 1, "n_head": 1, "d_model": 16, "seq_len": 16},
                           "stages": [st]})


@pytest.mark.parametrize("batch_size", [1, 3, 8, 10, 16])
def test_union_over_ranks_is_the_global_batch_for_every_world_size(batch_size):
    for b in (0, 1, 7):
        want = list(range(b * batch_size, (b + 1) * batch_size))
        for world in (1, 2, 4):
            got = [i for r in range(world) for i in sample_indices(b, r, world, batch_size)]
            if batch_size >= world:
                assert got == want  # contiguous shares, ranks in order, nothing twice
            else:  # fewer samples than ranks: every rank still reads one, all of the batch is read
                assert set(got) == set(want) and len(got) == world


def test_local_share_sizes_and_errors():
    assert [local_share(r, 4, 10) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [local_share(r, 2, 16) for r in range(2)] == [(0, 8), (8, 16)]
    for bad in ((2, 2, 8), (-1, 2, 8), (0, 1, 0)):
        with pytest.raises(ValueError):
            local_share(*bad)
    with pytest.raises(ValueError):
        sample_indices(-1, 0, 1, 8)


def test_micro_batches_split_a_share():
    share = sample_indices(3, 1, 2, 16)  # [56, 64)
    assert micro_batches(share) == [share]
    assert micro_batches(share, 8) == [share] and micro_batches(share, 100) == [share]
    assert micro_batches(share, 4) == [share[:4], share[4:]]
    assert micro_batches(share, 3) == [share[:3], share[3:6], share[6:]]
    with pytest.raises(ValueError):
        micro_batches(share, 0)


@pytest.mark.parametrize("split", ["train", "val"])
def test_global_batch_tokens_do_not_depend_on_the_world_size(split):
    m = get_mixture()
    B, T = 8, 24
    for b in (0, 5):
        one = m.batch(11, b, 0, B, T, MIX, split, world_size=1)
        assert one.shape == (B, T + 1)
        for world in (2, 4):
            parts = [m.batch(11, b, r, B, T, MIX, split, world_size=world) for r in range(world)]
            assert torch.equal(torch.cat(parts), one)
        # any sample on its own, in any order, is the same row
        assert torch.equal(m.samples(11, [b * B + 6, b * B + 1], B, T, MIX, split), one[[6, 1]])
    assert not torch.equal(m.batch(11, 0, 0, B, T, MIX, world_size=1), m.batch(11, 1, 0, B, T, MIX, world_size=1))
    assert not torch.equal(m.batch(11, 0, 0, B, T, MIX, world_size=1), m.batch(12, 0, 0, B, T, MIX, world_size=1))


def test_one_rank_is_bit_identical_to_the_per_rank_layout():
    """The default (one-rank) batches are exactly the ones drawn before global indices."""
    m = get_mixture()
    for b in range(6):
        for mix in (MIX, {"curated": 0.9, "web": 0.1}):
            assert torch.equal(m.batch(0, b, 0, 16, 128, mix, world_size=1), m.batch(0, b, 0, 16, 128, mix))
            assert torch.equal(m.batch(0, b, 0, 16, 128, mix, "val", world_size=1),
                               m.batch(0, b, 0, 16, 128, mix, "val"))


def test_cursor_and_skip_list_count_global_batches():
    """The harness cursor hands out batch indices; a skipped index is a whole global batch, so
    skipping it removes the same samples at any world size."""
    from trainguard.workers.runtime.harness import DataCursor

    c = DataCursor()
    c.add_skip([[1, 3]])
    taken = [c.take() for _ in range(3)]
    assert taken == [0, 3, 4]
    for world in (1, 2, 4):
        trained = {i for b in taken for r in range(world) for i in sample_indices(b, r, world, 8)}
        assert trained == set(range(0, 8)) | set(range(24, 40))


def _grads(stage: PretrainStage, batch_index: int) -> tuple[float, list[torch.Tensor]]:
    stage.model.zero_grad(set_to_none=True)
    res = stage.step(batch_index, 0, MIX)
    res.loss.backward()
    return float(res.loss.detach()), [p.grad.clone() for p in stage.model.parameters()]


def test_pretrain_stage_trains_on_the_same_samples_at_every_world_size():
    """One rank over the whole global batch == the mean of two ranks' halves (what the
    all-reduce averages), and == two accumulated micro-steps of half the batch."""
    spec = _spec()
    one = PretrainStage(make_context(spec, "pretrain", run_id="r", device=torch.device("cpu")))
    loss1, g1 = _grads(one, 3)
    halves = []
    for rank in range(2):
        st = PretrainStage(make_context(spec, "pretrain", run_id="r", rank=rank, world_size=2,
                                        device=torch.device("cpu")))
        halves.append(_grads(st, 3))
    assert abs(loss1 - (halves[0][0] + halves[1][0]) / 2) < 1e-5
    for a, b0, b1 in zip(g1, halves[0][1], halves[1][1]):
        torch.testing.assert_close(a, (b0 + b1) / 2, rtol=1e-4, atol=1e-6)
    # gradient accumulation as the harness would run it: micro-steps of one rank's share
    model, mix = one.model, get_mixture()
    model.zero_grad(set_to_none=True)
    total = 0.0
    share = sample_indices(3, 0, 1, 8)
    for micro in micro_batches(share, 4):
        rows = mix.samples(spec.seed, micro, 8, spec.model.seq_len, MIX)
        loss = lm_loss(model, rows[:, :-1], rows[:, 1:]) * (len(micro) / len(share))
        loss.backward()
        total += float(loss.detach())
    assert abs(total - loss1) < 1e-5
    for a, p in zip(g1, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_micro_batch_size_in_the_spec():
    st = _spec().stages[0]
    assert st.micro_batch_size is None and "micro_batch_size" not in st.model_dump()
    st = _spec(micro_batch_size=4).stages[0]
    assert st.micro_batch_size == 4 and st.model_dump()["micro_batch_size"] == 4
    assert dataclasses.is_dataclass(make_context(_spec(micro_batch_size=4), "pretrain", run_id="r",
                                                 device=torch.device("cpu")))
    with pytest.raises(SpecError, match="micro_batch_size"):
        _spec(micro_batch_size=9)
    with pytest.raises(SpecError, match="micro_batch_size"):
        _spec(micro_batch_size=0)


def _rows(tokens, mask_or_valid, pad):
    """Unpadded rows (a rank pads its share to its own longest row)."""
    return [[t for t in row if t != pad] for row in tokens.tolist()]


def test_instruction_batches_by_global_index():
    from trainguard.workers.tokenizer import PAD

    B = 8
    for b in (0, 4):
        # one rank: the per-rank layout, bit for bit
        assert torch.equal(data.sft_batch(0, b, 0, B, 64, world_size=1)[0], data.sft_batch(0, b, 0, B, 64)[0])
        assert all(torch.equal(x, y) for x, y in zip(data.preference_batch(0, b, 0, B, 64, world_size=1),
                                                     data.preference_batch(0, b, 0, B, 64)))
        assert torch.equal(data.prompt_batch(0, b, 0, B, 40, world_size=1)[0], data.prompt_batch(0, b, 0, B, 40)[0])
        for fn, n in ((data.sft_batch, 64), (data.preference_batch, 64), (data.prompt_batch, 40)):
            whole = _rows(fn(0, b, 0, B, n, world_size=1)[0], None, PAD)
            for world in (2, 4):
                parts = [fn(0, b, r, B, n, world_size=world) for r in range(world)]
                assert [len(p[0]) for p in parts] == [B // world] * world
                assert [row for p in parts for row in _rows(p[0], None, PAD)] == whole
