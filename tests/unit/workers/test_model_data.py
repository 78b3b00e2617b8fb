"""Tokenizer, model and data: shapes, causality, determinism, the held-out split."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainguard.workers import data
from trainguard.workers.model import (
    GPT,
    RewardModel,
    build_gpt,
    build_reward_model,
    count_parameters,
    generate,
    load_model_state,
    load_weights,
    sequence_logprobs,
)
from trainguard.workers.spec import ModelSpec
from trainguard.workers.tokenizer import BOS, EOS, PAD, SEP, VOCAB_SIZE, decode, encode

from ._tiny import recorded

torch.set_num_threads(1)
SPEC = ModelSpec(n_layer=2, n_head=2, d_model=32, seq_len=32)
MIX = {"web": 0.7, "curated": 0.3}


def test_tokenizer_round_trips_unicode_and_frames_with_specials():
    text = "déjà vu — naïve 🐍\n"
    ids = encode(text, bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS
    assert max(ids) < VOCAB_SIZE and len({BOS, EOS, PAD, SEP}) == 4 and VOCAB_SIZE == 260
    assert decode(ids) == text


def test_gpt_shapes_and_tied_embeddings():
    model = build_gpt(SPEC, seed=1)
    logits = model(torch.randint(0, 256, (3, 17)))
    assert logits.shape == (3, 17, VOCAB_SIZE)
    assert model.lm_head.weight is model.tok_emb.weight
    assert count_parameters(model) < sum(p.numel() for p in model.state_dict().values())


def test_gpt_is_causal():
    model = build_gpt(SPEC, seed=1).eval()
    x = torch.randint(0, 256, (1, 20))
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 7) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[0, :12], b[0, :12], atol=1e-6)
    assert not torch.allclose(a[0, 12:], b[0, 12:])


def test_left_padding_with_valid_mask_matches_unpadded():
    model = build_gpt(SPEC, seed=1).eval()
    x = torch.randint(0, 256, (1, 10))
    padded = torch.cat([torch.full((1, 4), PAD), x], dim=1)
    with torch.no_grad():
        ref = model(x)
        out = model(padded, padded != PAD)
    assert torch.allclose(ref, out[:, 4:], atol=1e-5)


def test_build_is_deterministic_and_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    a, b = build_gpt(SPEC, seed=3), build_gpt(SPEC, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(build_gpt(SPEC, seed=4).tok_emb.weight, a.tok_emb.weight)


def test_reward_model_reads_last_non_pad_token():
    rm = build_reward_model(SPEC, seed=1).eval()
    torch.nn.init.normal_(rm.head.weight, generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, 256, (2, 8))
    padded = torch.cat([x, torch.full((2, 5), PAD)], dim=1)
    with torch.no_grad():
        assert rm(x).shape == (2,)
        assert torch.allclose(rm(x), rm(padded), atol=1e-5)


def test_sequence_logprobs_count_only_masked_tokens():
    model = build_gpt(SPEC, seed=1).eval()
    tokens = torch.randint(0, 256, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(sequence_logprobs(model, tokens, mask), torch.zeros(2))
        mask[:, 6:] = True
        lp = sequence_logprobs(model, tokens, mask)
    assert lp.shape == (2,) and (lp < 0).all()


def test_generate_is_deterministic_from_its_generator_and_never_samples_specials():
    model = build_gpt(SPEC, seed=1).eval()
    prompt = torch.tensor([[BOS, 65, 66, SEP]] * 3)
    run = lambda s: generate(model, prompt, 12, torch.Generator().manual_seed(s))  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (3, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.isin(a[:, 4:], torch.tensor([BOS, PAD, SEP])).any()


def test_load_weights_converts_between_gpt_and_reward_model(tmp_path: Path):

    gpt = build_gpt(SPEC, seed=1)
    (tmp_path / "manifest.json").write_text("{}")
    torch.save(gpt.state_dict(), tmp_path / "model.pt")
    rm = build_reward_model(SPEC, seed=2)
    load_weights(rm, recorded(tmp_path))
    assert torch.equal(rm.backbone.tok_emb.weight, gpt.tok_emb.weight)
    torch.save(rm.state_dict(), tmp_path / "model.pt")
    assert any(k.startswith("backbone.") for k in load_model_state(recorded(tmp_path), "cpu"))
    back = build_gpt(SPEC, seed=3)
    load_weights(back, recorded(tmp_path))
    assert torch.equal(back.blocks[0].attn.qkv.weight, gpt.blocks[0].attn.qkv.weight)
    assert isinstance(back, GPT) and isinstance(rm, RewardModel)


def test_corpora_are_non_empty_with_disjoint_splits():
    mixture = data.get_mixture()
    for name in ("curated", "web"):
        corpus = mixture.corpora[name]
        assert len(corpus.streams["train"]) > 10_000 and len(corpus.streams["val"]) > 1_000
        assert corpus.train_keys and corpus.val_keys and not (corpus.train_keys & corpus.val_keys)


def test_sft_and_preference_splits_are_disjoint():
    train, val = data.sft_pairs("train"), data.sft_pairs("val")
    assert len(train) > 500 and len(val) > 50
    assert not {p.name for p in train} & {p.name for p in val}
    assert all(p.prompt == f"Explain {p.name}:" and p.response for p in train[:50])
    prefs = data.preference_pairs("val")
    assert len(prefs) == len(val) and all(p.chosen != p.rejected for p in prefs)


def test_batch_is_a_pure_function_of_its_arguments():
    m = data.get_mixture()
    a = m.batch(7, 3, 0, 4, 32, MIX)
    assert a.shape == (4, 33) and a.dtype == torch.long
    assert torch.equal(a, m.batch(7, 3, 0, 4, 32, dict(reversed(list(MIX.items())))))
    for other in (m.batch(7, 4, 0, 4, 32, MIX), m.batch(7, 3, 1, 4, 32, MIX), m.batch(8, 3, 0, 4, 32, MIX)):
        assert not torch.equal(a, other)
    assert not torch.equal(a, m.batch(7, 3, 0, 4, 32, {"curated": 1.0}))


def test_instruction_batches_are_deterministic_and_masked():
    tokens, mask = data.sft_batch(0, 5, 0, 4, 64)
    again, _ = data.sft_batch(0, 5, 0, 4, 64)
    assert torch.equal(tokens, again) and not torch.equal(tokens, data.sft_batch(0, 6, 0, 4, 64)[0])
    assert tokens.shape[1] <= 65 and mask.shape == tokens.shape
    assert not mask[tokens == PAD].any() and mask.any(dim=1).all()
    ch, chm, rj, rjm = data.preference_batch(0, 5, 0, 4, 64)
    assert ch.shape == rj.shape == chm.shape == rjm.shape and ch.shape[1] <= 64


def test_user_text_and_jsonl_sources(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("\n\n".join(f"paragraph number {i} about cats" for i in range(30)))
    (tmp_path / "docs.jsonl").write_text("\n".join(f'{{"text": "record {i} about dogs"}}' for i in range(30)))
    m = data.get_mixture({"notes": str(tmp_path / "notes.txt"), "docs": str(tmp_path / "docs.jsonl")})
    assert "cats" in decode(m.batch(0, 0, 0, 2, 40, {"notes": 1.0}).flatten().tolist())
    assert "dogs" in decode(m.batch(0, 0, 0, 2, 40, {"docs": 1.0}).flatten().tolist())
    with pytest.raises(ValueError, match="unknown source"):
        m.batch(0, 0, 0, 2, 40, {"nope": 1.0})


def test_load_weights_refuses_bytes_that_do_not_match_the_recorded_hashes(tmp_path: Path):
    from trainguard.workers.runtime.checkpoint import CheckpointCorrupt

    (tmp_path / "manifest.json").write_text("{}")
    torch.save(build_gpt(SPEC, seed=1).state_dict(), tmp_path / "model.pt")
    ref = recorded(tmp_path)
    torch.save(build_gpt(SPEC, seed=2).state_dict(), tmp_path / "model.pt")  # swapped after it was reported
    with pytest.raises(CheckpointCorrupt, match="model.pt"):
        load_weights(build_gpt(SPEC, seed=3), ref)
