"""A nanoGPT-style character model trained by its own loop, guarded by trainguard's loop API.

`train(g)` is the whole integration: the README ("Guard your own code") shows the diff from the
plain script (`main()` below, which runs without trainguard: `python examples/own_loop/charlm.py`).
The text is offline: the docstrings of a few standard-library modules.

Run it under the supervisor:

    export TRAINGUARD_USER_CODE_PATHS=$PWD/examples/own_loop TRAINGUARD_USER_CODE_MODULES=charlm
    trainguard serve &
    trainguard submit examples/own_loop/pipeline.yaml --wait
"""
from __future__ import annotations

import collections
import functools
import inspect
import json

import torch
from torch import nn
from torch.nn import functional as F


@functools.lru_cache(maxsize=1)
def corpus() -> str:
    import argparse
    import csv
    import textwrap

    return "\n\n".join(inspect.getdoc(m) or "" for m in (collections, argparse, csv, textwrap, json, functools))


class CharDataset:
    """Sample i: the `block` characters at offset i * stride, and the same shifted by one. The
    last `held_out` windows are not in it (`held_out_loss` reads them)."""

    def __init__(self, text: str, block: int = 64, stride: int = 7, held_out: int = 32) -> None:
        self.chars = sorted(set(text))
        self.ids = torch.tensor([self.chars.index(c) for c in text], dtype=torch.long)
        self.block, self.stride, self.held_out = block, stride, held_out

    @property
    def vocab(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return (len(self.ids) - self.block - 1) // self.stride - self.held_out

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        o = i * self.stride
        return self.ids[o : o + self.block], self.ids[o + 1 : o + self.block + 1]


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, block: int = 64, d: int = 48, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(block, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(block), persistent=False)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return F.cross_entropy(self.head(h).flatten(0, 1), y.flatten())


def held_out_loss(model: TinyGPT, data: CharDataset) -> float:
    """The loss on the held-out windows at the end of the text."""
    x, y = zip(*(data[len(data) + i] for i in range(data.held_out)))
    with torch.no_grad():
        return float(model.loss(torch.stack(x), torch.stack(y)))


def scramble(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss_spike fault's corrupted batch: every target replaced by one character."""
    x, y = batch
    return x, torch.zeros_like(y)


# -- guarded by trainguard (kind: loop, entrypoint: charlm:train) ---------------------------------
def train(g) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(g.seed)
    data = CharDataset(corpus(), block=int(g.options.get("block", 64)))
    model = TinyGPT(data.vocab, block=data.block)
    opt = torch.optim.AdamW(model.parameters(), lr=g.lr, weight_decay=0.1)
    g.register(model, opt, evaluate=lambda: {"val_loss": held_out_loss(model, data)})
    for batch in g.batches(data, corrupt=scramble):
        x, y = batch.data
        loss = model.loss(x, y)
        loss.backward()
        g.step(loss, tokens=x.numel())


# -- the plain script it came from ----------------------------------------------------------------
def main(steps: int = 200, batch_size: int = 16, lr: float = 3e-3) -> None:
    torch.manual_seed(0)
    data = CharDataset(corpus())
    model = TinyGPT(data.vocab, block=data.block)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True)
    step = 0
    while step < steps:
        for x, y in loader:
            loss = model.loss(x, y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % 50 == 0:
                print(step, float(loss.detach()), held_out_loss(model, data))
            if step == steps:
                break


if __name__ == "__main__":
    main()
