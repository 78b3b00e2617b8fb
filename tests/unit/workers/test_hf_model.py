"""Hugging Face models behind the stages' interface (workers/hf.py): the pipeline YAML for them,
the trained BPE tokenizer, the adapter on a tiny Llama saved locally (never downloaded), and
export. The built-in GPT path is untouched by all of it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from trainguard.workers import data
from trainguard.workers.spec import SpecError, parse_pipeline
from trainguard.workers.tokenizer import BYTE_TOKENIZER

from tests.support import save_tiny_llama

CORPUS = [f"def f{i}(x):\n    \"\"\"Return x plus {i}, the {i}th helper.\"\"\"\n    return x + {i}\n" for i in range(200)]
LLAMA = {"architecture": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 2}


def _pipeline(model: dict, **extra) -> object:
    return parse_pipeline({"name": "h", "seed": 3, "model": model, **extra,
                           "stages": [{"name": "pretrain", "kind": "pretrain", "steps": 2},
                                      {"name": "sft", "kind": "sft", "steps": 2}]})


# ---------------------------------------------------------------- spec


@pytest.mark.parametrize("model, field", [
    ({"hf": {}}, "exactly one of model.hf.path"),
    ({"hf": {"path": "/m", "config": {"architecture": "llama"}}}, "exactly one of model.hf.path"),
    ({"hf": {"path": "models/tiny"}}, "absolute local folder"),
    ({"hf": {"path": "s3://bucket/m"}}, "absolute local folder"),
    ({"hf": {"config": {"hidden_size": 32}}}, "model.hf.config.architecture"),
    ({"hf": {"config": {"architecture": "gpt-j"}}}, "model.hf.config.architecture"),
    ({"hf": {"config": {**LLAMA, "vocab_size": 100}}}, "model.hf.config.vocab_size"),
    ({"hf": {"config": {**LLAMA, "auto_map": "x"}}}, "model.hf.config.auto_map"),
    ({"hf": {"config": {**LLAMA, "max_position_embeddings": 16}}, "seq_len": 32}, "max_position_embeddings"),
    ({"hf": {"config": {**LLAMA, "rope": {"a": 1}}}}, "model.hf.config.rope"),
    ({"hf": {"path": "/m"}, "n_layer": 4}, "model.n_layer does not apply"),
    ({"hf": {"path": "/m", "tokenizer_vocab_size": 10}}, "model.hf.tokenizer_vocab_size"),
    ({"hf": {"path": "/m", "revision": "main"}}, "model.hf.revision"),
])
def test_hf_model_spec_errors_name_the_field(model, field):
    with pytest.raises(SpecError) as e:
        _pipeline(model)
    assert field in str(e.value)


def test_hf_model_spec_round_trips_and_gpt_spec_dumps_as_before():
    spec = _pipeline({"seq_len": 32, "hf": {"config": LLAMA}})
    assert spec.model.hf.config == LLAMA and spec.model.hf.path is None
    assert parse_pipeline(spec.model_dump(mode="json")) == spec
    gpt = _pipeline({"n_layer": 1})
    assert gpt.model.hf is None and "hf" not in gpt.model_dump()["model"] and '"hf"' not in gpt.model_dump_json()
    assert parse_pipeline(gpt.model_dump(mode="json")) == gpt


def test_built_in_path_imports_no_transformers():
    code = ("import sys; import trainguard.workers.runtime.harness, trainguard.workers.stages, "
            "trainguard.service.cli, trainguard.service.access, trainguard.service.export; "
            "print(json.dumps([m for m in ('transformers', 'tokenizers') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


# ---------------------------------------------------------------- tokenizer


def test_bpe_training_is_deterministic_and_saved_tokenizer_is_reused(tmp_path, monkeypatch):
    from trainguard.workers import hf

    a, b = hf.train_bpe_tokenizer(CORPUS, 320), hf.train_bpe_tokenizer(CORPUS, 320)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    monkeypatch.setattr(data, "tokenizer_training_texts", lambda files: CORPUS)
    spec = _pipeline({"seq_len": 32, "hf": {"config": LLAMA, "tokenizer_vocab_size": 320}})
    first = hf.stage_tokenizer(spec.model, {}, "run-1", tmp_path)
    assert (hf.tokenizer_dir(tmp_path, "run-1") / "tokenizer.json").is_file()
    monkeypatch.setattr(data, "tokenizer_training_texts", lambda files: pytest.fail("trained again"))
    again = hf.stage_tokenizer(spec.model, {}, "run-1", tmp_path)
    assert again.key == first.key == hf.HFTokenizer(a).key
    assert first.vocab_size == 320 and len({first.bos, first.eos, first.pad, first.sep}) == 4
    ids = first.encode("def f7(x): return x + 7")
    assert first.decode(ids) == "def f7(x): return x + 7" and len(ids) < len("def f7(x): return x + 7")
    assert first.rare not in {first.bos, first.eos, first.pad, first.sep}


def test_data_layer_encodes_with_the_stage_tokenizer(tmp_path):
    from trainguard.workers import hf

    tok = hf.HFTokenizer(hf.train_bpe_tokenizer(CORPUS, 320))
    t, m = data.sft_batch(1, 0, 0, 4, 32, tokenizer=tok)
    assert t.shape[1] <= 33 and int(t.max()) < tok.vocab_size
    assert (t[:, 0] == tok.bos).all() and ((t == tok.sep).sum(1) == 1).all()
    p, v = data.prompt_batch(1, 0, 0, 4, 24, tokenizer=tok)
    assert ((p == tok.pad) == ~v).all() and (p[:, -1] == tok.sep).all()
    ch, chm, _, _ = data.preference_batch(1, 0, 0, 4, 32, tokenizer=tok)
    g = data.garble_responses(ch, chm, "k", tokenizer=tok)
    assert not torch.equal(g, ch) and ((g == tok.eos) == (ch == tok.eos)).all()
    # the byte path is the default, unchanged
    assert torch.equal(data.sft_batch(1, 0, 0, 4, 32)[0], data.sft_batch(1, 0, 0, 4, 32, tokenizer=BYTE_TOKENIZER)[0])


# ---------------------------------------------------------------- adapter and export


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny Llama built from a LlamaConfig and saved (safetensors + tokenizer): nothing downloaded."""
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", CORPUS)


def test_adapter_satisfies_the_stage_interface(llama_folder):
    from trainguard.workers import hf
    from trainguard.workers.model import build_lm, build_scorer, generate, load_weights, sequence_logprobs

    spec = _pipeline({"seq_len": 32, "hf": {"path": str(llama_folder)}})
    tok = hf.stage_tokenizer(spec.model, {}, "r", None)
    lm = build_lm(spec.model, 1, "cpu", tok).eval()
    assert isinstance(lm, hf.HFCausalLM)
    t, m = data.sft_batch(1, 0, 0, 3, 32, tokenizer=tok)
    assert lm(t[:, :-1]).shape == (3, t.shape[1] - 1, tok.vocab_size)
    assert sequence_logprobs(lm, t, m).shape == (3,)
    # left padding with `valid` reproduces the unpadded logits
    x = torch.tensor([tok.encode("def f3(x): return")])
    padded = torch.cat([torch.full((1, 4), tok.pad), x], 1)
    valid = padded != tok.pad
    torch.testing.assert_close(lm(padded, valid)[:, 4:], lm(x), atol=1e-5, rtol=1e-4)
    p, v = data.prompt_batch(1, 0, 0, 3, 20, tokenizer=tok)
    out = generate(lm, p, 6, torch.Generator().manual_seed(0), 1.0, v)
    assert out.shape == (3, p.shape[1] + 6)
    assert not torch.isin(out[:, p.shape[1]:], torch.tensor([tok.bos, tok.pad, tok.sep])).any()
    with pytest.raises(ValueError, match="exceeds model.seq_len"):
        lm(torch.zeros((1, 33), dtype=torch.long))
    rm = build_scorer(spec.model, 2, "cpu", tok)
    assert torch.equal(rm(t[:, :-1]), torch.zeros(3)) and rm(p, v).shape == (3,)


def test_export_round_trips_through_from_pretrained(llama_folder, tmp_path):
    import io

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainguard.workers import hf
    from trainguard.workers.contract import CheckpointRef
    from trainguard.workers.model import build_lm, load_model_state, load_weights

    spec = _pipeline({"seq_len": 32, "hf": {"path": str(llama_folder)}})
    tok = hf.stage_tokenizer(spec.model, {}, "r", None)
    lm = build_lm(spec.model, 1, "cpu", tok)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.01)
    # a checkpoint's model.pt, read back through the verified loader
    ck = tmp_path / "ck"
    ck.mkdir()
    buf = io.BytesIO()
    torch.save(lm.state_dict(), buf)
    (ck / "model.pt").write_bytes(buf.getvalue())
    import hashlib

    (ck / "manifest.json").write_text("{}")
    files = {n: {"sha256": hashlib.sha256((ck / n).read_bytes()).hexdigest(), "bytes": (ck / n).stat().st_size}
             for n in ("model.pt", "manifest.json")}
    state = load_model_state(CheckpointRef(str(ck), files))
    other = build_lm(spec.model, 5, "cpu", tok)
    load_weights(other, CheckpointRef(str(ck), files))
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), lm.state_dict().values()))
    out = hf.export_hf(spec.model, state, llama_folder, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, trust_remote_code=False,
                                                  use_safetensors=True)
    ltok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert (out / "model.safetensors").is_file()
    torch.testing.assert_close(loaded.lm_head.weight, lm.hf.lm_head.weight)
    ids = ltok("def f1(x):", return_tensors="pt").input_ids
    gen = loaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=ltok.pad_token_id)
    assert gen.shape[1] > ids.shape[1]


def test_hf_pretrain_resumes_bit_identically(tmp_path, monkeypatch):
    from trainguard.workers.contract import Control, ControlKind
    from trainguard.workers.runtime.harness import Harness, make_context
    from trainguard.workers.stages import STAGES

    monkeypatch.setattr(data, "tokenizer_training_texts", lambda files: CORPUS)
    spec = parse_pipeline({"name": "h", "seed": 3, "model": {"seq_len": 16, "hf": {"config": LLAMA, "tokenizer_vocab_size": 320}},
                           "checkpoint": {"every": 3, "asynchronous": False},
                           "stages": [{"name": "pretrain", "kind": "pretrain", "steps": 6, "batch_size": 2,
                                       "eval_every": 100}]})

    def harness(state_dir, **kw):
        ctx = make_context(spec, "pretrain", run_id="run1", device=torch.device("cpu"), state_dir=state_dir)
        return Harness(STAGES["pretrain"](ctx), spec=spec, stage_name="pretrain", run_id="run1", state_dir=state_dir, **kw)

    def stop_at_3(h):
        if h.step == 3:
            h.inbox.put(Control(ControlKind.STOP, seq=1))

    full = harness(tmp_path / "a")
    assert full.run()["state"] == "finished"
    first = harness(tmp_path / "b", on_step=stop_at_3)
    out = first.run()
    assert out["state"] == "stopped" and out["step"] == 3
    second = harness(tmp_path / "b", resume_from=first.own[out["last_checkpoint"]])
    assert second.run()["state"] == "finished"
    a, b = full.stage.model.state_dict(), second.stage.model.state_dict()
    assert list(a)[0].startswith("hf.") and all(torch.equal(a[k], b[k]) for k in a)
