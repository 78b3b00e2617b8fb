"""Byte-level tokenizer: nothing to download, every string round-trips.

Ids 0..255 are the UTF-8 bytes; four specials follow. A byte vocabulary keeps the
tiny CPU models honest (no merges learned on one corpus leaking into another) and
makes "a rare token" for corrupted batches easy to name.
"""
from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "BOS", "EOS", "PAD", "SEP", "VOCAB_SIZE", "SPECIAL_IDS", "RARE_BYTE", "encode", "decode",
    "Tokenizer", "ByteTokenizer", "BYTE_TOKENIZER",
]

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


class Tokenizer:
    """What the data layer and the stages need from a tokenizer (the byte one below, or a
    Hugging Face one through workers/hf.py `HFTokenizer`): the four special ids, a token a
    trained model gives ~0 probability (`rare`, for the corrupted-batch fault), the vocabulary
    size, `encode`/`decode`, and `key` (a stable name the per-process caches are keyed on)."""

    key: str
    bos: int
    eos: int
    pad: int
    sep: int
    rare: int
    vocab_size: int
    is_byte: bool = False

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def filler_ids(self) -> list[int]:
        """Ordinary token ids a garbled response may be made of (no specials)."""
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """The module-level byte tokenizer as an object (the default of every StageContext)."""

    key = "byte"
    bos, eos, pad, sep, rare, vocab_size = BOS, EOS, PAD, SEP, RARE_BYTE, VOCAB_SIZE
    is_byte = True

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return encode(text, bos, eos)

    def decode(self, ids: Iterable[int]) -> str:
        return decode(ids)

    def filler_ids(self) -> list[int]:
        return list(range(32, 127))


BYTE_TOKENIZER = ByteTokenizer()
