"""A tiny Llama (built from a config, nothing downloaded) trained by a Hugging Face Trainer,
guarded by trainguard: `train(g)` swaps `Trainer` for `GuardedTrainer` (the README, "Hugging Face
Trainer"; `main()` below is the plain Trainer script it came from: `python examples/hf_trainer/tiny_llama.py`).
Tokens are the bytes of a few standard-library modules' docstrings.

Needs the extra: pip install 'trainguard[hf-trainer]'. Run it under the supervisor:

    export TRAINGUARD_USER_CODE_PATHS=$PWD/examples/hf_trainer TRAINGUARD_USER_CODE_MODULES=tiny_llama
    trainguard serve &
    trainguard submit examples/hf_trainer/pipeline.yaml --wait
"""
from __future__ import annotations

import functools
import inspect
import os
from typing import Any

import torch

# nothing is fetched from the Hub (the workers set these too); transformers is imported inside the
# functions, so checking the entrypoint at submit (an import of this module) stays quick
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@functools.lru_cache(maxsize=1)
def corpus() -> bytes:
    import argparse
    import collections
    import csv
    import json
    import textwrap

    return "\n\n".join(inspect.getdoc(m) or "" for m in (collections, argparse, csv, textwrap, json, functools)).encode()


class ByteWindows(torch.utils.data.Dataset):
    """Sample i: `block` bytes at offset (first + i) * stride, as input_ids and labels (the model
    shifts the labels itself). `ByteWindows(held_out=True)` is the last `n_eval` windows only."""

    def __init__(self, block: int = 32, stride: int = 5, n_eval: int = 32, held_out: bool = False) -> None:
        self.ids = torch.tensor(list(corpus()), dtype=torch.long)
        total = (len(self.ids) - block) // stride
        self.block, self.stride = block, stride
        self.first, self.n = (total - n_eval, n_eval) if held_out else (0, total - n_eval)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        o = (self.first + i) * self.stride
        x = self.ids[o : o + self.block]
        return {"input_ids": x, "labels": x.clone()}


def tiny_llama(block: int, seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=block,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False)
    return LlamaForCausalLM(config)


# -- guarded by trainguard (kind: loop, entrypoint: tiny_llama:train) -----------------------------
def train(g) -> None:  # type: ignore[no-untyped-def]
    from trainguard.workers.runtime.hf_trainer import GuardedTrainer

    block = int(g.options.get("block", 32))
    trainer = GuardedTrainer(g, model=tiny_llama(block, g.seed), train_dataset=ByteWindows(block),
                             eval_dataset=ByteWindows(block, held_out=True))
    trainer.train()  # the loss_spike fault's batch: every label byte 0 (corrupt_labels), a byte the text lacks


# -- the plain script it came from ----------------------------------------------------------------
def main(steps: int = 200, block: int = 32) -> None:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="/tmp/tiny-llama", max_steps=steps, per_device_train_batch_size=16,
                             learning_rate=3e-3, weight_decay=0.1, warmup_steps=10, lr_scheduler_type="cosine",
                             eval_strategy="steps", eval_steps=50, logging_steps=50, save_strategy="no",
                             report_to="none", use_cpu=not torch.cuda.is_available())
    Trainer(model=tiny_llama(block, 0), args=args, train_dataset=ByteWindows(block),
            eval_dataset=ByteWindows(block, held_out=True)).train()


if __name__ == "__main__":
    main()
