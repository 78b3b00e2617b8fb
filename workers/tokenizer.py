"""Byte-level tokenizer: nothing to download, every string round-trips.

Ids 0..255 are the UTF-8 bytes; four specials follow. A byte vocabulary keeps the
tiny CPU models honest (no merges learned on one corpus leaking into another) and
makes "a rare token" for corrupted batches easy to name.
"""
from __future__ import annotations

from collections.abc import Iterable

__all__ = ["BOS", "EOS", "PAD", "SEP", "VOCAB_SIZE", "SPECIAL_IDS", "RARE_BYTE", "encode", "decode"]

BOS = 256
EOS = 257
PAD = 258
SEP = 259  # between a prompt and its response
VOCAB_SIZE = 260
SPECIAL_IDS = frozenset({BOS, EOS, PAD, SEP})
RARE_BYTE = 0x07  # ASCII BEL: never appears in the corpora, so a trained model gives it ~0 probability


def encode(text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """UTF-8 bytes of `text`, optionally framed by BOS/EOS."""
    ids = list(text.encode("utf-8"))
    if bos:
        ids.insert(0, BOS)
    if eos:
        ids.append(EOS)
    return ids


def decode(ids: Iterable[int]) -> str:
    """Inverse of `encode`; specials are dropped and invalid UTF-8 (a sampled half
    character) is replaced rather than raised, since model samples are arbitrary bytes."""
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")
