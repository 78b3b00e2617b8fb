"""The run's trained tokenizer is kept like a checkpoint (workers/hf.py `stage_tokenizer`):
a manifest of the sha256 of every file, written last, published with the folder by one
atomic rename; every load verifies every file before anything is parsed."""
from __future__ import annotations

import json
import re

import pytest

from trainguard.workers import data

CORPUS = [f"def f{i}(x):\n    \"\"\"Return x plus {i}, the {i}th helper.\"\"\"\n    return x + {i}\n" for i in range(200)]
LLAMA = {"architecture": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 2}


@pytest.fixture
def hf(monkeypatch):
    from trainguard.workers import hf as mod

    monkeypatch.setattr(data, "tokenizer_training_texts", lambda files: CORPUS)
    return mod


def _model_spec():
    from trainguard.workers.spec import parse_pipeline

    return parse_pipeline({"name": "h", "seed": 3, "model": {"seq_len": 32, "hf": {"config": LLAMA, "tokenizer_vocab_size": 320}},
                           "stages": [{"name": "pretrain", "kind": "pretrain", "steps": 2}]}).model


def _saved(hf, state, run="run-1"):
    tok = hf.stage_tokenizer(_model_spec(), {}, run, state)
    return tok, hf.tokenizer_dir(state, run)


def test_saved_with_a_manifest_of_every_file_and_loaded_back_verified(hf, tmp_path, monkeypatch):
    tok, folder = _saved(hf, tmp_path)
    manifest = json.loads((folder / hf.TOKENIZER_MANIFEST).read_text())
    others = sorted(p.name for p in folder.iterdir() if p.name != hf.TOKENIZER_MANIFEST)
    assert "tokenizer.json" in others and sorted(manifest["files"]) == others
    assert not [p for p in tmp_path.joinpath("runs", "run-1").iterdir() if p.name.startswith(".tmp")]
    monkeypatch.setattr(data, "tokenizer_training_texts", lambda files: pytest.fail("trained again"))
    again = hf.stage_tokenizer(_model_spec(), {}, "run-1", tmp_path)
    assert again.key == tok.key
    assert hf.load_hf_tokenizer(folder).name_or_path == str(folder)


def test_flipped_byte_in_tokenizer_json_is_refused_naming_the_file(hf, tmp_path, monkeypatch):
    _, folder = _saved(hf, tmp_path)
    p = folder / "tokenizer.json"
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    p.write_bytes(bytes(raw))
    parsed = []
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, *a, **k: parsed.append(a) or pytest.fail("parsed before verification")))
    with pytest.raises(hf.TokenizerIntegrityError, match=r"tokenizer\.json: sha256 mismatch"):
        hf.stage_tokenizer(_model_spec(), {}, "run-1", tmp_path)
    with pytest.raises(hf.TokenizerIntegrityError, match=re.escape(str(p))):
        hf.load_hf_tokenizer(folder)  # the export path (service/export.py) loads the same way
    assert parsed == []


def test_deleted_manifest_is_refused_and_not_retrained_over(hf, tmp_path, monkeypatch):
    _, folder = _saved(hf, tmp_path)
    (folder / hf.TOKENIZER_MANIFEST).unlink()
    monkeypatch.setattr(data, "tokenizer_training_texts", lambda files: pytest.fail("trained again"))
    with pytest.raises(hf.TokenizerIntegrityError, match=r"tokenizer\.manifest\.json: missing"):
        hf.stage_tokenizer(_model_spec(), {}, "run-1", tmp_path)
    with pytest.raises(hf.TokenizerIntegrityError, match="manifest"):
        hf.load_hf_tokenizer(folder)  # a run's folder needs one even when the caller did not say
    assert (folder / "tokenizer.json").is_file()  # left for a person to look at


@pytest.mark.parametrize("change", ["missing", "extra", "manifest_edited"])
def test_missing_extra_or_forged_file_is_refused(hf, tmp_path, change):
    _, folder = _saved(hf, tmp_path)
    if change == "missing":
        victim = next(n for n in json.loads((folder / hf.TOKENIZER_MANIFEST).read_text())["files"] if n != "tokenizer.json")
        (folder / victim).unlink()
        want = rf"{victim}: listed in the tokenizer manifest but missing"
    elif change == "extra":
        (folder / "added_tokens.json").write_text("{}")
        want = r"added_tokens\.json: not in the tokenizer manifest"
    else:  # the file table edited without its digest: the manifest itself is refused
        m = json.loads((folder / hf.TOKENIZER_MANIFEST).read_text())
        m["files"]["tokenizer.json"]["sha256"] = "0" * 64
        (folder / hf.TOKENIZER_MANIFEST).write_text(json.dumps(m))
        want = r"tokenizer\.manifest\.json: its digest does not match"
    with pytest.raises(hf.TokenizerIntegrityError, match=want):
        hf.load_hf_tokenizer(folder)


def test_deterministic_retrain_gives_identical_hashes(hf, tmp_path):
    _, a = _saved(hf, tmp_path / "a")
    _, b = _saved(hf, tmp_path / "b")
    ma = json.loads((a / hf.TOKENIZER_MANIFEST).read_text())
    mb = json.loads((b / hf.TOKENIZER_MANIFEST).read_text())
    assert ma["files"] == mb["files"] and ma["digest"] == mb["digest"]


def test_a_rank_that_loses_the_publish_race_checks_it_trained_the_same(hf, tmp_path, monkeypatch):
    """Two ranks both train: the second's rename fails on the published folder; it compares
    manifests, removes its temporary folder, and refuses a tokenizer that differs."""
    first, folder = _saved(hf, tmp_path)
    published = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_exists = type(folder).exists
    # the second rank looked before the first published: it trains too
    monkeypatch.setattr(type(folder), "exists", lambda self: False if self == folder else real_exists(self))
    second = hf.stage_tokenizer(_model_spec(), {}, "run-1", tmp_path)
    assert second.key == first.key
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == published
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tokenizer"]
    monkeypatch.setattr(data, "tokenizer_training_texts", lambda files: CORPUS[:50])  # trains a different one
    with pytest.raises(hf.TokenizerIntegrityError, match="differs from the one this rank trained"):
        hf.stage_tokenizer(_model_spec(), {}, "run-1", tmp_path)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tokenizer"]


def test_model_folder_tokenizer_needs_no_manifest(hf, tmp_path):
    from tests.support import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "llama", CORPUS)
    assert not (folder / hf.TOKENIZER_MANIFEST).exists()
    assert hf.load_hf_tokenizer(folder).is_fast
