"""Helpers shared by the tests and the benchmarks (no pytest import: `python -m tests.bench` uses it)."""
from __future__ import annotations

import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout the tests run from


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL (idempotent)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def spawn_gloo_ranks(worker, world: int, out: Path) -> Path:
    """Run `worker(rank, port, out_dir)` in `world` processes (torch.multiprocessing, no Ray);
    `port` is a free localhost port for their gloo rendezvous. Returns `out`."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(out)), nprocs=world, join=True)
    return out


def flat_state(model, optimizer) -> dict:
    """A model's and optimizer's state as one flat {name: tensor copy} dict ("m.<param>",
    "o.<param id>.<key>"), for bitwise comparisons."""
    import torch

    out = {f"m.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for pid, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            out[f"o.{pid}.{k}"] = torch.as_tensor(v).clone()
    return out


def save_tiny_llama(folder: Path, corpus: list[str]) -> Path:
    """A one-layer Llama built from a LlamaConfig, with a BPE tokenizer trained on `corpus`,
    saved as a local Hugging Face folder (safetensors): nothing is downloaded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainguard.workers.hf import train_bpe_tokenizer

    tok = train_bpe_tokenizer(corpus, 320)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def export_and_generate(run_id: str, stage: str, out: Path, state_dir: Path, capsys, new_tokens: int = 8):
    """`trainguard export RUN --stage STAGE --to OUT --json`, then the folder loaded as any
    Hugging Face model folder is (offline, no remote code, safetensors only) and asked to
    generate exactly `new_tokens` tokens. Returns the loaded model."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainguard.service.cli import main as cli_main

    rc = cli_main(["export", run_id, "--stage", stage, "--to", str(out), "--state-dir", str(state_dir), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["stage"] == stage and result["path"] == str(out.resolve())
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, trust_remote_code=False,
                                                 use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tok("Explain json.dumps:", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + new_tokens
    assert isinstance(tok.decode(gen[0, ids.shape[1]:]), str)
    return model


class StageSignalsStub:
    """The watch's view of one stage (service.domain.evaluate.StageSignals) with rank 0's
    per-step `records` only: for running the detectors over a stage's exported records."""

    def __init__(self, kind: str, records: list[dict]) -> None:
        self.kind, self.records = kind, {0: records}
        self.handled_until: dict[str, int] = {}
        self.counter_series: dict = {}
        self.heartbeat: dict[int, float] = {}
        self.paused_ranks: set[int] = set()
        self.last_step = records[-1]["step"] if records else 0
        self.started_at = self.resumed_at = 0.0
        self.ranks = [0]
        self.steps = max((int(r["step"]) for r in records), default=0)
        self.idle: dict[int, float] = {}

