"""Pre-tokenized token shards: data at scale, memory-mapped, never loaded whole.

Format (llm.c's, so its shards read as they are): a header of 256 little-endian int32 —
[0] magic 20240520, [1] version (1: uint16 tokens, 2: uint32 tokens), [2] token count,
[3] vocabulary size of the tokenizer that wrote it (0: unknown, e.g. an llm.c shard) —
then the tokens. Reading checks magic, version and that the file is exactly header +
count tokens long; a shard that fails is refused with an error naming the file.

A pipeline's `data: {name: PATH}` may name a shard `.bin` file or a folder of them
(workers/data.py `get_mixture`). A folder written by `trainguard tokenize` holds
`train_NNNNNN.bin` and `val_NNNNNN.bin`: documents go to the validation split by the same
stable hash as the text sources (workers/data.py `is_validation`), and each document is
BOS tokens EOS, so a shard source trains on exactly the tokens its .txt/.jsonl would. A
single file (or a folder without val shards) holds out its last VAL_FRACTION of tokens.
Samples are windows read through `ShardStream` with the same deterministic cursor as the
other sources (workers/data.py `Mixture.samples`).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from trainguard.workers.tokenizer import BYTE_TOKENIZER, Tokenizer

__all__ = [
    "MAGIC",
    "HEADER_INTS",
    "HEADER_BYTES",
    "VERSIONS",
    "SHARD_TOKENS",
    "ShardError",
    "ShardStream",
    "write_shard",
    "read_header",
    "open_shard",
    "is_shard_source",
    "shard_splits",
    "load_tokenizer",
    "tokenize_files",
]

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSIONS: dict[int, type[np.unsignedinteger]] = {1: np.uint16, 2: np.uint32}
SHARD_TOKENS = 100_000_000  # tokens per shard written (llm.c's size); the header counts in int32
_MAX_TOKENS = 2**31 - 1


class ShardError(ValueError):
    """A token shard that cannot be read; the message names the file."""


def write_shard(path: str | Path, tokens: Any, vocab_size: int = 0) -> Path:
    """Write `tokens` (1-D ints) as one shard, atomically; uint16 when every id fits."""
    arr = np.asarray(tokens)
    if arr.ndim != 1 or arr.size > _MAX_TOKENS:
        raise ValueError(f"{path}: a shard holds 1..{_MAX_TOKENS} tokens in one dimension")
    top = max(int(vocab_size) - 1, int(arr.max()) if arr.size else 0)
    if arr.size and int(arr.min()) < 0:
        raise ValueError(f"{path}: negative token ids")
    version = 1 if top < 2**16 else 2
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:4] = (MAGIC, version, arr.size, int(vocab_size))
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(arr.astype(np.dtype(VERSIONS[version]).newbyteorder("<")).tobytes())
    os.replace(tmp, p)
    return p


def read_header(path: str | Path) -> tuple[int, int, int]:
    """(version, token count, vocabulary size) of a valid shard; ShardError naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ShardError(f"token shard {str(p)!r} does not exist")
    size = p.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"token shard {str(p)!r} is {size} bytes, shorter than its {HEADER_BYTES}-byte header")
    with open(p, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    magic, version, count, vocab = (int(x) for x in header[:4])
    if magic != MAGIC:
        raise ShardError(f"token shard {str(p)!r} has magic {magic}, not {MAGIC}: not a token shard")
    if version not in VERSIONS:
        raise ShardError(f"token shard {str(p)!r} has version {version}; known: {sorted(VERSIONS)}")
    itemsize = np.dtype(VERSIONS[version]).itemsize
    if count < 0 or size != HEADER_BYTES + count * itemsize:
        raise ShardError(f"token shard {str(p)!r} is {size} bytes; its header says {count} tokens of "
                         f"{itemsize} bytes ({HEADER_BYTES + max(count, 0) * itemsize} bytes): truncated or corrupt")
    return version, count, vocab


def open_shard(path: str | Path) -> np.memmap:
    """The tokens of a valid shard, memory-mapped read-only."""
    version, count, _ = read_header(path)
    dtype = np.dtype(VERSIONS[version]).newbyteorder("<")
    if count == 0:
        return np.zeros(0, dtype=dtype)  # type: ignore[return-value]
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


class ShardStream:
    """Token ranges of one or more shards as one read-only stream: `len`, and slices `s[a:b]`
    (a numpy array; a window may span two shards)."""

    def __init__(self, segments: list[tuple[np.ndarray, int, int]], name: str) -> None:
        self.segments = [(m, lo, hi) for m, lo, hi in segments if hi > lo]
        self.name = name
        self.starts = np.cumsum([0] + [hi - lo for _, lo, hi in self.segments])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a ShardStream is read by contiguous slices only")
        a, b, _ = key.indices(len(self))
        parts = []
        i = int(np.searchsorted(self.starts, a, side="right")) - 1
        while a < b and i < len(self.segments):
            m, lo, hi = self.segments[i]
            off = a - int(self.starts[i])
            take = min(b - a, (hi - lo) - off)
            parts.append(np.asarray(m[lo + off : lo + off + take]))
            a += take
            i += 1
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def is_shard_source(path: str | Path) -> bool:
    """A `data:` entry that names token shards: a .bin file, or a folder holding .bin files."""
    p = Path(path)
    return p.suffix == ".bin" or (p.is_dir() and any(p.glob("*.bin")))


def shard_splits(path: str | Path, val_fraction: float) -> tuple[ShardStream, ShardStream, int]:
    """(train, val, vocabulary size recorded in the headers: the largest, 0 if none) of a
    shard file or folder; every shard is validated (ShardError naming the file)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.bin"))
        val_files = [f for f in files if "val" in f.stem.split("_")]
        train_files = [f for f in files if f not in val_files]
    elif p.suffix == ".bin":
        train_files, val_files = [p], []
    else:
        raise ShardError(f"token shards {str(p)!r}: neither a .bin file nor a folder of them")
    if not train_files:
        raise ShardError(f"token shards {str(p)!r}: no training shards (only {[f.name for f in val_files]})")
    vocab = 0
    opened = {}
    for f in train_files + val_files:
        vocab = max(vocab, read_header(f)[2])
        opened[f] = open_shard(f)
    train = [(opened[f], 0, len(opened[f])) for f in train_files]
    if val_files:
        val = [(opened[f], 0, len(opened[f])) for f in val_files]
    else:  # hold out the tail of the last training shard(s)
        total = sum(len(m) for m, _, _ in train)
        n_val = max(1, int(total * val_fraction))
        val, rest = [], n_val
        while rest > 0 and train:
            m, lo, hi = train.pop()
            take = min(rest, hi - lo)
            val.insert(0, (m, hi - take, hi))
            if hi - take > lo:
                train.append((m, lo, hi - take))
            rest -= take
    tr, va = ShardStream(train, f"{p}:train"), ShardStream(val, f"{p}:val")
    if len(tr) == 0:
        raise ShardError(f"token shards {str(p)!r} hold too few tokens for a training split")
    return tr, va, vocab


def load_tokenizer(name: str) -> Tokenizer:
    """`bytes` (the built-in byte tokenizer) or a local Hugging Face tokenizer folder."""
    if name == "bytes":
        return BYTE_TOKENIZER
    from trainguard.workers.hf import HFTokenizer, load_hf_tokenizer

    if not Path(name).is_dir():
        raise ValueError(f"tokenizer {name!r}: give 'bytes' or a local tokenizer folder")
    return HFTokenizer(load_hf_tokenizer(name))


def tokenize_files(sources: list[str | Path], tokenizer: Tokenizer, out: str | Path,
                   shard_tokens: int = SHARD_TOKENS) -> dict[str, Any]:
    """Tokenize .txt/.jsonl files (workers/data.py `file_documents`: what the same file as a
    text source reads) into `out`/train_NNNNNN.bin and val_NNNNNN.bin, documents split as the
    text sources split them, each BOS tokens EOS. Returns a summary."""
    from trainguard.workers.data import file_documents, split_documents  # data imports this module

    if not 1 <= shard_tokens <= _MAX_TOKENS:
        raise ValueError(f"shard_tokens must be in 1..{_MAX_TOKENS}")
    docs = [d for s in sources for d in file_documents(s)]
    if not docs:
        raise ValueError("no documents in " + ", ".join(map(str, sources)))
    train, val = split_documents(docs)
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    for old in [*dest.glob("train_*.bin"), *dest.glob("val_*.bin")]:
        old.unlink()  # a rerun replaces the shards, never mixes with them
    summary: dict[str, Any] = {"out": str(dest), "tokenizer": tokenizer.key, "vocab_size": tokenizer.vocab_size,
                               "documents": {"train": len(train), "val": len(val)}, "tokens": {}, "shards": []}
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    for split, split_docs in (("train", train), ("val", val)):
        buf: list[np.ndarray] = []
        held, n_shard, total = 0, 0, 0

        def flush(final: bool) -> None:
            nonlocal buf, held, n_shard
            data = np.concatenate(buf) if buf else np.zeros(0, dtype)
            while len(data) >= shard_tokens or (final and len(data)):
                chunk, data = data[:shard_tokens], data[shard_tokens:]
                path = write_shard(dest / f"{split}_{n_shard:06d}.bin", chunk, tokenizer.vocab_size)
                summary["shards"].append(str(path))
                n_shard += 1
            buf, held = ([data] if len(data) else []), len(data)

        for i in range(0, len(split_docs), 1024):
            texts = [d.text for d in split_docs[i : i + 1024]]
            for ids in tokenizer.encode_batch(texts):
                arr = np.array([tokenizer.bos, *ids, tokenizer.eos], dtype=dtype)
                buf.append(arr)
                held += len(arr)
                total += len(arr)
            if held >= shard_tokens:
                flush(False)
        flush(True)
        summary["tokens"][split] = total
    return summary


# ---------------------------------------------------------------- `trainguard tokenize`


def add_tokenize_parser(sub: Any) -> Any:
    """The `tokenize` subcommand's arguments (service/cli.py wires it)."""
    p = sub.add_parser("tokenize", help="write pre-tokenized token shards from .txt/.jsonl files",
                       description="tokenize .txt/.jsonl files into DIR/train_NNNNNN.bin and DIR/val_NNNNNN.bin "
                                   "token shards, usable as a pipeline `data:` source")
    p.add_argument("sources", nargs="+", metavar="SRC", help=".txt (paragraphs) or .jsonl ({\"text\": ...}) files")
    p.add_argument("--tokenizer", default="bytes", metavar="bytes|PATH",
                   help="'bytes' (the built-in byte tokenizer) or a local Hugging Face tokenizer folder "
                        "(default: %(default)s)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created)")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def run_tokenize(args: Any) -> int:
    import json

    summary = tokenize_files(list(args.sources), load_tokenizer(args.tokenizer), args.out, args.shard_tokens)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{len(summary['shards'])} shard(s) in {summary['out']}: {summary['tokens']['train']} train and "
              f"{summary['tokens']['val']} val tokens ({summary['tokenizer']}, vocabulary {summary['vocab_size']})")
    return 0
