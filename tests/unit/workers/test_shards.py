"""Pre-tokenized token shards (workers/shards.py) as a pipeline data source."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainguard.workers import data, shards
from trainguard.workers.data import Corpus, file_documents, get_mixture
from trainguard.workers.shards import HEADER_BYTES, MAGIC, ShardError, read_header, tokenize_files, write_shard
from trainguard.workers.spec import parse_pipeline
from trainguard.workers.tokenizer import BYTE_TOKENIZER


@pytest.fixture()
def sources(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("\n\n".join(f"Paragraph {i}: cats and dogs, ünïcode {i * 7}." for i in range(60)))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"record {i} about birds"}) for i in range(30)))
    return txt, jsonl


def _read_split(folder, split):
    files = sorted(folder.glob(f"{split}_*.bin"))
    return np.concatenate([np.asarray(shards.open_shard(f)) for f in files]).astype(np.int64)


@pytest.mark.parametrize("which", [0, 1])
def test_round_trip_tokenize_then_read_back_identical_tokens(tmp_path, sources, which):
    src = sources[which]
    out = tmp_path / "shards"
    summary = tokenize_files([src], BYTE_TOKENIZER, out, shard_tokens=300)  # several shards per split
    assert len(list(out.glob("train_*.bin"))) > 1
    corpus = Corpus("x", file_documents(src))  # the same file as a text source
    for split in ("train", "val"):
        got = _read_split(out, split)
        assert np.array_equal(got, corpus.streams[split].astype(np.int64))
        assert summary["tokens"][split] == len(got)
        assert read_header(sorted(out.glob(f"{split}_*.bin"))[0])[0] == 1  # uint16
    # the stream view reads windows across shard boundaries
    sc = data.ShardCorpus("x", out)
    s = sc.streams["train"]
    assert len(s) == len(corpus.streams["train"])
    for a, b in ((0, 10), (290, 320), (0, len(s)), (len(s) - 5, len(s))):
        assert np.array_equal(s[a:b].astype(np.int64), corpus.streams["train"][a:b].astype(np.int64))
    # a rerun replaces the shards
    tokenize_files([src], BYTE_TOKENIZER, out)
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_000000.bin", "val_000000.bin"]


def test_a_shard_source_trains_on_the_same_batches_as_its_text(tmp_path, sources):
    txt, _ = sources
    out = tmp_path / "shards"
    tokenize_files([txt], BYTE_TOKENIZER, out)
    a, b = get_mixture({"notes": str(txt)}), get_mixture({"notes": str(out)})
    assert isinstance(b.corpora["notes"], data.ShardCorpus)
    for split in ("train", "val"):
        for idx in (0, 3):
            x = a.batch(1, idx, 0, 6, 32, {"notes": 1.0, "web": 0.5}, split, world_size=1)
            y = b.batch(1, idx, 0, 6, 32, {"notes": 1.0, "web": 0.5}, split, world_size=1)
            assert torch.equal(x, y)


def test_shard_sampling_is_deterministic_and_independent_of_the_world_size(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, 50_000)
    write_shard(tmp_path / "big.bin", tokens, vocab_size=260)  # a single file: val is its tail
    m = get_mixture({"big": str(tmp_path / "big.bin")})
    mix = {"big": 1.0}
    one = m.batch(9, 4, 0, 8, 64, mix, world_size=1)
    assert torch.equal(one, get_mixture({"big": str(tmp_path / "big.bin")}).batch(9, 4, 0, 8, 64, mix, world_size=1))
    for world in (2, 4):
        assert torch.equal(torch.cat([m.batch(9, 4, r, 8, 64, mix, world_size=world) for r in range(world)]), one)
    # every row is a window of the training part of the file
    train, val = m.corpora["big"].streams["train"], m.corpora["big"].streams["val"]
    assert len(train) + len(val) == 50_000 and len(val) == 5_000
    flat = tokens[: len(train)]
    for row in one.numpy():
        starts = np.flatnonzero(flat[: len(flat) - 64] == row[0])
        assert any(np.array_equal(flat[s : s + 65], row) for s in starts)
    assert not torch.equal(one, m.batch(9, 5, 0, 8, 64, mix, world_size=1))


def test_a_pipeline_spec_naming_shards_validates_and_runs(tmp_path, sources):
    out = tmp_path / "shards"
    tokenize_files(list(sources), BYTE_TOKENIZER, out)
    spec = parse_pipeline({"name": "s", "data": {"tok": str(out), "one": str(out / "train_000000.bin")},
                           "stages": [{"name": "p", "kind": "pretrain", "steps": 2,
                                       "mixture": {"tok": 0.5, "one": 0.2, "web": 0.3}}]})
    m = get_mixture(spec.data)
    assert m.batch(spec.seed, 0, 0, 4, 16, dict(spec.stages[0].mixture), world_size=1).shape == (4, 17)
    # a shard folder is not a text source for a fresh tokenizer's training
    assert data.tokenizer_training_texts(spec.data) == data.tokenizer_training_texts()


def _corrupt(path, offset, value):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 4] = np.array([value], "<i4").tobytes()
    path.write_bytes(bytes(raw))


def test_bad_shards_are_refused_naming_the_file(tmp_path):
    good = write_shard(tmp_path / "good.bin", np.arange(100), vocab_size=260)
    assert read_header(good) == (1, 100, 260)
    cases = {
        "magic": lambda p: _corrupt(p, 0, 12345),
        "version": lambda p: _corrupt(p, 4, 7),
        "bytes": lambda p: p.write_bytes(p.read_bytes()[:-2]),  # truncated
        "count": lambda p: _corrupt(p, 8, 101),
        "header": lambda p: p.write_bytes(p.read_bytes()[:100]),
    }
    for what, damage in cases.items():
        bad = write_shard(tmp_path / f"bad-{what}.bin", np.arange(100), vocab_size=260)
        damage(bad)
        with pytest.raises(ShardError, match=f"bad-{what}.bin"):
            read_header(bad)
        with pytest.raises(ShardError, match=f"bad-{what}.bin"):
            get_mixture({f"src{what}": str(bad)})
    with pytest.raises(ShardError, match="missing.bin"):
        get_mixture({"m": str(tmp_path / "missing.bin")})


def test_vocabularies_must_fit_the_pipeline_tokenizer(tmp_path):
    big = write_shard(tmp_path / "wide.bin", np.array([1, 2, 70_000, 3] * 50), vocab_size=80_000)
    assert read_header(big) == (2, 200, 80_000)  # uint32
    assert np.array_equal(np.asarray(shards.open_shard(big)), [1, 2, 70_000, 3] * 50)
    with pytest.raises(ValueError, match="80000-token vocabulary"):
        data.ShardCorpus("w", big)
    # an llm.c-style shard records no vocabulary: its ids are checked instead
    header = np.zeros(256, "<i4")
    header[:3] = (MAGIC, 1, 4)
    (tmp_path / "llmc.bin").write_bytes(header.tobytes() + np.array([1, 2, 300, 4], "<u2").tobytes())
    assert (tmp_path / "llmc.bin").stat().st_size == HEADER_BYTES + 8
    with pytest.raises(ValueError, match="token id 300"):
        data.ShardCorpus("l", tmp_path / "llmc.bin")


def test_cli_tokenize(tmp_path, sources, capsys):
    from trainguard.service.cli import main

    out = tmp_path / "cli"
    assert main(["tokenize", *map(str, sources), "--tokenizer", "bytes", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokenizer"] == "byte" and summary["documents"]["train"] > 0 and summary["shards"]
    assert main(["tokenize", str(tmp_path / "nope.txt"), "--out", str(out)]) == 1
    assert "nope.txt" in capsys.readouterr().err
    assert main(["tokenize", str(sources[0]), "--tokenizer", str(tmp_path / "no-such-tok"), "--out", str(out)]) == 1


def test_tokenize_with_a_hugging_face_tokenizer_folder(tmp_path, sources):
    from trainguard.workers import hf

    folder = tmp_path / "tok"
    hf.train_bpe_tokenizer([p.read_text() for p in sources] * 3, 320).save_pretrained(str(folder))
    tok = shards.load_tokenizer(str(folder))
    out = tmp_path / "hf-shards"
    tokenize_files([sources[0]], tok, out)
    corpus = Corpus("x", file_documents(sources[0]), tok)
    for split in ("train", "val"):
        assert np.array_equal(_read_split(out, split), corpus.streams[split].astype(np.int64))
    assert read_header(out / "train_000000.bin")[2] == tok.vocab_size
    data.ShardCorpus("x", out, tok)  # fits its own tokenizer
