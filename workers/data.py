"""Training data that exists on every machine with Python: no download, no data set.

Sources (each a token stream per split):
  curated  docstrings of a fixed list of standard-library modules, classes, functions
  web      raw standard-library source files (code, comments, licence headers: noisier)
  <name>   user files from the pipeline's `data` mapping (.txt paragraphs, .jsonl {"text"})

Documents go to the validation split by a stable hash of their key (never Python's
salted `hash`), so the split is the same in every process. Everything is built once
per process (lru_cache) and takes well under 2 s.

Determinism: every batch is a pure function of its arguments through `derive_seed`;
nothing here touches the global RNGs, so a resumed run draws exactly the batches an
uninterrupted one would.

Global sample indices (pretraining/annealing mixtures): global batch b of a stage with
global batch size B holds samples [b*B, (b+1)*B); sample i is a pure function of (seed,
i, B, seq_len, mixture, split) — never of the rank or the world size. Rank r of W reads its
contiguous share (`sample_indices`), which gradient accumulation may split further
(`micro_batches`), so a checkpoint resumed at another world size trains on exactly the
same samples. The batch cursor and the skip list count global batches. Sample b*B + j is
row j of the rank-0 batch the one-rank layout always drew (same seed derivation), so
single-rank batches are bit-identical to those before global indices existed.

Sources may also be pre-tokenized token shards (workers/shards.py), memory-mapped.

Instruction data: SFT pairs ("Explain <qualified name>:" -> first sentence of its
docstring) and preference pairs (chosen = that sentence; rejected = another entry's
sentence or a garbled copy) come from the same curated docstrings and the same split.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainguard.workers import shards
from trainguard.workers.tokenizer import BOS, BYTE_TOKENIZER, EOS, PAD, Tokenizer

__all__ = [
    "STDLIB_MODULES",
    "VAL_FRACTION",
    "Document",
    "Corpus",
    "Mixture",
    "SFTPair",
    "PreferencePair",
    "derive_seed",
    "is_validation",
    "curated_documents",
    "web_documents",
    "file_documents",
    "ShardCorpus",
    "split_documents",
    "local_share",
    "sample_indices",
    "micro_batches",
    "get_mixture",
    "sft_pairs",
    "preference_pairs",
    "garble",
    "encode_pair",
    "collate_sft",
    "collate_preferences",
    "sft_batch",
    "garble_responses",
    "preference_batch",
    "prompt_batch",
    "tokenizer_training_texts",
]

# Fixed, import-safe list (no GUI, no deprecated modules that warn on import). The
# order is part of the data: changing it changes every batch.
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "collections", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions",
    "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "inspect", "io", "ipaddress", "itertools", "json", "logging", "math", "numbers",
    "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched",
    "shlex", "shutil", "statistics", "string", "struct", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "tokenize", "traceback", "typing", "unittest",
    "urllib.parse", "uuid", "warnings", "weakref", "zipfile", "zlib",
)
VAL_FRACTION = 0.1
WEB_CHUNK_CHARS = 4096
WEB_MAX_CHARS_PER_FILE = 64 * 1024
MAX_RESPONSE_CHARS = 96
PRINTABLE = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?()[]{}<>@#$%^&*+-=/|~_'\"`", dtype=np.uint8)


@dataclass(frozen=True)
class Document:
    key: str  # stable identity: decides the split
    text: str


@dataclass(frozen=True)
class SFTPair:
    name: str  # qualified name, e.g. "json.dumps"
    prompt: str
    response: str


@dataclass(frozen=True)
class PreferencePair:
    name: str
    prompt: str
    chosen: str
    rejected: str


def derive_seed(*parts: object) -> int:
    """64-bit seed from any JSON-able parts; identical in every process and on every machine."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little")


def _rng(*parts: object) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derive_seed(*parts)))


def is_validation(key: str) -> bool:
    """Held-out documents: a stable hash of the key, about VAL_FRACTION of them."""
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "little")
    return h % 1000 < VAL_FRACTION * 1000


# ---------------------------------------------------------------- documents


def _import(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


def _public(obj: object) -> list[str]:
    return [n for n in sorted(vars(obj)) if not n.startswith("_")]


def _documented(qualname: str, obj: object) -> tuple[str, str] | None:
    try:
        doc = inspect.getdoc(obj)
    except Exception:  # noqa: BLE001 - exotic descriptors
        return None
    return (qualname, doc.strip()) if doc and doc.strip() else None


def _walk_module(modname: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) of the module, its public classes/routines and their methods.

    Read from the module's source with `ast` where it has one, so the corpus is the same in
    every process whatever was imported or patched at run time (Ray replaces
    inspect.isgenerator, pytest threading.excepthook); modules without source (built in)
    are inspected, keeping only objects defined in them."""
    module = _import(modname)
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        source = None
    if source is not None:
        return _walk_source(modname, ast.parse(source))
    out = [_documented(modname, module)]
    for name in _public(module):
        obj = getattr(module, name, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or getattr(obj, "__module__", None) != modname:
            continue
        out.append(_documented(f"{modname}.{name}", obj))
        if inspect.isclass(obj):
            for meth in _public(obj):
                member = getattr(obj, meth, None)
                if inspect.isroutine(member):
                    out.append(_documented(f"{modname}.{name}.{meth}", member))
    return [x for x in out if x is not None]


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _walk_source(modname: str, tree: ast.Module) -> list[tuple[str, str]]:
    def doc(qualname: str, node: ast.AST) -> list[tuple[str, str]]:
        d = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        return [(qualname, d.strip())] if d and d.strip() else []

    out = doc(modname, tree)
    for node in sorted((n for n in tree.body if isinstance(n, _DEFS) and not n.name.startswith("_")),
                       key=lambda n: n.name):
        out += doc(f"{modname}.{node.name}", node)
        if isinstance(node, ast.ClassDef):
            for meth in sorted((m for m in node.body if isinstance(m, _DEFS[:2]) and not m.name.startswith("_")),
                               key=lambda m: m.name):
                out += doc(f"{modname}.{node.name}.{meth.name}", meth)
    return out


@functools.lru_cache(maxsize=1)
def _docstrings() -> tuple[tuple[str, str], ...]:
    """Every (qualified name, docstring), first occurrence of each docstring text only:
    re-exports and inherited docs would otherwise put one text in both splits."""
    seen: set[str] = set()
    out = []
    with warnings.catch_warnings():  # deprecated aliases (typing.io, ...) warn when touched
        warnings.simplefilter("ignore")
        walked = [item for modname in STDLIB_MODULES for item in _walk_module(modname)]
    for qualname, doc in walked:
        if doc not in seen:
            seen.add(doc)
            out.append((qualname, doc))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def curated_documents() -> tuple[Document, ...]:
    return tuple(Document(q, f"{q}\n{doc}") for q, doc in _docstrings())


def _chunks(key: str, text: str, size: int) -> list[Document]:
    return [Document(f"{key}#{i}", text[o : o + size]) for i, o in enumerate(range(0, len(text), size))]


@functools.lru_cache(maxsize=1)
def web_documents() -> tuple[Document, ...]:
    """Raw source of the pure-Python modules of STDLIB_MODULES, in chunks."""
    docs: list[Document] = []
    for modname in STDLIB_MODULES:
        try:
            path = inspect.getsourcefile(_import(modname))
        except TypeError:  # built-in module: no source file
            continue
        if path and Path(path).is_file():
            text = Path(path).read_text(encoding="utf-8", errors="replace")[:WEB_MAX_CHARS_PER_FILE]
            docs.extend(_chunks(modname, text, WEB_CHUNK_CHARS))
    return tuple(docs)


def file_documents(path: str | Path) -> tuple[Document, ...]:
    """A user source: .jsonl ({"text": ...} per line) or plain text split into paragraphs."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data file {str(p)!r} does not exist")
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    docs.append(Document(f"{p.name}:{i}", str(json.loads(line)["text"])))
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f'{p}:{i + 1}: expected a JSON object with a "text" field') from None
        return tuple(docs)
    paragraphs = [t.strip() for t in re.split(r"\n\s*\n", p.read_text(encoding="utf-8", errors="replace"))]
    return tuple(Document(f"{p.name}:{i}", t) for i, t in enumerate(paragraphs) if t)


# ---------------------------------------------------------------- corpora and mixture


class Corpus:
    """One source as two token streams (train, val): BOS text EOS, document after document."""

    def __init__(self, name: str, docs: tuple[Document, ...], tokenizer: Tokenizer | None = None) -> None:
        if not docs:
            raise ValueError(f"data source {name!r} has no documents")
        train, val = split_documents(docs)
        self.name = name
        self.train_keys = frozenset(d.key for d in train)
        self.val_keys = frozenset(d.key for d in val)
        self.streams = {"train": _stream(train, tokenizer), "val": _stream(val, tokenizer)}

    def _start(self, rng: np.random.Generator, length: int, split: str) -> int:
        """The window's start: the only draw a sample makes (`skip` makes the same one)."""
        n = len(self.streams[split])
        if n <= length:
            n *= length // n + 2
        return int(rng.integers(0, n - length))

    def sample(self, rng: np.random.Generator, length: int, split: str) -> np.ndarray:
        """A random window of `length` tokens (the stream is tiled when shorter)."""
        start = self._start(rng, length, split)
        s = self.streams[split]
        if len(s) <= length:
            s = np.tile(s[0 : len(s)], length // len(s) + 2)
        return s[start : start + length]

    def skip(self, rng: np.random.Generator, length: int, split: str) -> None:
        """Advance `rng` exactly as `sample` would, reading nothing."""
        self._start(rng, length, split)


class ShardCorpus(Corpus):
    """A source of pre-tokenized shards (workers/shards.py): memory-mapped token streams,
    sampled exactly like the text sources' streams."""

    def __init__(self, name: str, path: str | Path, tokenizer: Tokenizer | None = None) -> None:
        train, val, vocab = shards.shard_splits(path, VAL_FRACTION)
        t = tokenizer or BYTE_TOKENIZER
        if vocab > t.vocab_size:
            raise ValueError(f"data source {name!r}: the shards in {str(path)!r} were written with a "
                             f"{vocab}-token vocabulary; the pipeline's tokenizer has {t.vocab_size}")
        if vocab == 0:  # no recorded vocabulary (e.g. llm.c shards): check the ids themselves
            top = max(int(np.max(m[lo:hi])) for s in (train, val) for m, lo, hi in s.segments)
            if top >= t.vocab_size:
                raise ValueError(f"data source {name!r}: the shards in {str(path)!r} hold token id {top}; "
                                 f"the pipeline's tokenizer has {t.vocab_size} tokens")
        self.name = name
        self.train_keys = self.val_keys = frozenset()
        self.streams = {"train": train, "val": val}  # type: ignore[dict-item]


def split_documents(docs: tuple[Document, ...] | list[Document]) -> tuple[list[Document], list[Document]]:
    """(train, val) documents of a source: by `is_validation`, at least one of each."""
    val = [d for d in docs if is_validation(d.key)]
    train = [d for d in docs if not is_validation(d.key)]
    if not val:  # tiny user files: hold out the last document anyway
        val, train = train[-1:], train[:-1] or train[-1:]
    if not train:
        train = val
    return train, val


def _source(name: str, path: str, tokenizer: Tokenizer | None = None) -> Corpus:
    if shards.is_shard_source(path):
        return ShardCorpus(name, path, tokenizer)
    return Corpus(name, file_documents(path), tokenizer)


# ---------------------------------------------------------------- global sample indices


def local_share(rank: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """[lo, hi): positions in a global batch of `batch_size` that rank `rank` of `world_size`
    reads — contiguous, ranks in order, the first batch_size % world_size ranks one more.
    With fewer samples than ranks, rank r re-reads position r % batch_size (no rank idles)."""
    if not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"no share for rank {rank} of world size {world_size}, batch size {batch_size}")
    if batch_size < world_size:
        return rank % batch_size, rank % batch_size + 1
    q, r = divmod(batch_size, world_size)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


def sample_indices(batch_index: int, rank: int, world_size: int, batch_size: int) -> list[int]:
    """Global sample indices rank `rank` of `world_size` trains on in global batch
    `batch_index` (samples [batch_index*batch_size, (batch_index+1)*batch_size))."""
    if batch_index < 0:
        raise ValueError(f"batch index {batch_index} is negative")
    lo, hi = local_share(rank, world_size, batch_size)
    base = batch_index * batch_size
    return list(range(base + lo, base + hi))


def micro_batches(indices: list[int], micro_batch_size: int | None = None) -> list[list[int]]:
    """A rank's share split into gradient-accumulation micro-batches of at most
    `micro_batch_size` (None: the whole share, one micro-step)."""
    if micro_batch_size is None or micro_batch_size >= len(indices):
        return [list(indices)]
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be positive, not {micro_batch_size}")
    return [list(indices[i : i + micro_batch_size]) for i in range(0, len(indices), micro_batch_size)]


def _stream(docs: list[Document], tokenizer: Tokenizer | None = None) -> np.ndarray:
    if tokenizer is not None and not tokenizer.is_byte:
        ids = tokenizer.encode_batch([d.text for d in docs])
        return np.concatenate([np.array([tokenizer.bos, *x, tokenizer.eos], np.int32) for x in ids])
    parts = []
    for d in docs:
        body = np.frombuffer(d.text.encode("utf-8"), dtype=np.uint8).astype(np.int16)
        parts += [np.array([BOS], np.int16), body, np.array([EOS], np.int16)]
    return np.concatenate(parts)


class Mixture:
    """Named corpora and weighted sampling from them."""

    def __init__(self, corpora: dict[str, Corpus]) -> None:
        self.corpora = corpora

    def _weights(self, mixture: dict[str, float]) -> tuple[list[str], np.ndarray, list[list[object]]]:
        names = sorted(mixture)
        for n in names:
            if n not in self.corpora:
                raise ValueError(f"mixture names unknown source {n!r} (known: {sorted(self.corpora)})")
        w = np.array([float(mixture[n]) for n in names])
        if w.sum() <= 0:
            raise ValueError("mixture weights sum to zero")
        return names, w, [[n, float(mixture[n])] for n in names]

    def samples(
        self,
        seed: int,
        indices: list[int],
        batch_size: int,
        seq_len: int,
        mixture: dict[str, float],
        split: str = "train",
    ) -> torch.LongTensor:
        """(len(indices), T+1) token windows: the global samples `indices` of a stage whose
        global batch size is `batch_size`. Sample i is row i % B of global batch i // B, drawn
        from that batch's own generator (rows before it are drawn and discarded, never read)."""
        if not indices:
            raise ValueError("no sample indices")
        names, w, mix_key = self._weights(mixture)
        p = w / w.sum()
        wanted: dict[int, dict[int, list[int]]] = {}
        for out, i in enumerate(indices):
            if i < 0:
                raise ValueError(f"sample index {i} is negative")
            wanted.setdefault(i // batch_size, {}).setdefault(i % batch_size, []).append(out)
        rows: list[np.ndarray | None] = [None] * len(indices)
        for b, positions in wanted.items():
            rng = _rng("lm", seed, b, 0, batch_size, seq_len, mix_key, split)
            for j in range(max(positions) + 1):
                corpus = self.corpora[names[int(rng.choice(len(names), p=p))]]
                if j in positions:
                    row = corpus.sample(rng, seq_len + 1, split)
                    for out in positions[j]:
                        rows[out] = row
                else:
                    corpus.skip(rng, seq_len + 1, split)
        return torch.from_numpy(np.stack(rows).astype(np.int64))  # type: ignore[arg-type]

    def batch(
        self,
        seed: int,
        batch_index: int,
        rank: int,
        batch_size: int,
        seq_len: int,
        mixture: dict[str, float],
        split: str = "train",
        world_size: int | None = None,
    ) -> torch.LongTensor:
        """(B, T+1) token windows; row sources drawn by `mixture` weights. Pure function of the args.

        With `world_size`, `batch_size` is the global batch size and the rows are rank `rank`'s
        share of global batch `batch_index` (`sample_indices`): independent of the world size.
        Without it (the older per-rank layout), `batch_size` rows keyed on the rank; the two
        agree for rank 0 of one."""
        if world_size is not None:
            return self.samples(seed, sample_indices(batch_index, rank, world_size, batch_size),
                                batch_size, seq_len, mixture, split)
        names, w, mix_key = self._weights(mixture)
        rng = _rng("lm", seed, batch_index, rank, batch_size, seq_len, mix_key, split)
        rows = []
        for _ in range(batch_size):
            src = names[int(rng.choice(len(names), p=w / w.sum()))]
            rows.append(self.corpora[src].sample(rng, seq_len + 1, split))
        return torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T+1)


@functools.lru_cache(maxsize=8)
def _mixture(files: tuple[tuple[str, str], ...]) -> Mixture:
    corpora = {"curated": Corpus("curated", curated_documents()), "web": Corpus("web", web_documents())}
    for name, path in files:
        corpora[name] = _source(name, path)
    return Mixture(corpora)


_TOKENIZED_MIXTURES: dict[tuple[tuple[tuple[str, str], ...], str], Mixture] = {}


def get_mixture(data_files: dict[str, str] | None = None, tokenizer: Tokenizer | None = None) -> Mixture:
    """The process-wide cached corpora: curated, web and the pipeline's extra files, as token
    streams of `tokenizer` (default: bytes). Non-byte mixtures are cached by `tokenizer.key`."""
    files = tuple(sorted((data_files or {}).items()))
    if tokenizer is None or tokenizer.is_byte:
        return _mixture(files)
    key = (files, tokenizer.key)
    if key not in _TOKENIZED_MIXTURES:
        corpora = {"curated": Corpus("curated", curated_documents(), tokenizer),
                   "web": Corpus("web", web_documents(), tokenizer)}
        for name, path in files:
            corpora[name] = _source(name, path, tokenizer)
        if len(_TOKENIZED_MIXTURES) >= 4:
            _TOKENIZED_MIXTURES.clear()
        _TOKENIZED_MIXTURES[key] = Mixture(corpora)
    return _TOKENIZED_MIXTURES[key]


def tokenizer_training_texts(data_files: dict[str, str] | None = None) -> list[str]:
    """Training-split texts of every source, in a fixed order: what a fresh tokenizer learns from."""
    docs = [*curated_documents(), *web_documents()]
    for _name, path in sorted((data_files or {}).items()):
        if not shards.is_shard_source(path):  # shards are tokens already
            docs.extend(file_documents(path))
    return [d.text for d in docs if not is_validation(d.key)]


# ---------------------------------------------------------------- instruction data


def _first_sentence(doc: str) -> str:
    para = " ".join(doc.split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.!?])\s", para, maxsplit=1)[0]
    if len(sentence) > MAX_RESPONSE_CHARS:
        sentence = sentence[:MAX_RESPONSE_CHARS].rsplit(" ", 1)[0]
    return sentence


@functools.lru_cache(maxsize=2)
def sft_pairs(split: str) -> tuple[SFTPair, ...]:
    """"Explain <qualified name>:" -> first sentence of its docstring, for `split` in train/val."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    out = []
    for qualname, doc in _docstrings():
        response = _first_sentence(doc)
        if len(response) >= 8 and is_validation(qualname) == (split == "val"):
            out.append(SFTPair(qualname, f"Explain {qualname}:", response))
    return tuple(out)


def garble(text: str, key: str, rate: float = 1.0) -> str:
    """`text` with a fraction `rate` of its characters replaced by random printable ones:
    from slightly off to nothing any docstring reads like."""
    rng = _rng("garble", key)
    data = np.frombuffer(text.encode(), dtype=np.uint8).copy()
    hit = rng.random(len(data)) < rate
    data[hit] = PRINTABLE[rng.integers(0, len(PRINTABLE), int(hit.sum()))]
    return data.tobytes().decode("utf-8", errors="replace")


def _rejected(pairs: tuple[SFTPair, ...], i: int) -> str:
    """A worse answer for pair i, one of three kinds by a stable hash of its name:
    another entry's summary (fluent but wrong), a partly garbled copy (10-100% of the
    characters), or a truncated copy (under half the words, possibly empty). Graded
    corruption and truncation teach the reward model a scale a policy's samples fall
    on, instead of a garbage detector every fluent sample saturates, or one that pays
    for empty answers."""
    p = pairs[i]
    h = derive_seed("pref", p.name)
    u = (h >> 8) % 1000 / 1000.0
    if h % 3 == 0 and len(pairs) > 1:
        return pairs[(i + 1 + (h >> 20) % (len(pairs) - 1)) % len(pairs)].response
    if h % 3 == 1:
        return garble(p.response, p.name, rate=0.1 + 0.9 * u)
    words = p.response.split()
    return " ".join(words[: int(len(words) * 0.5 * u)])


@functools.lru_cache(maxsize=2)
def preference_pairs(split: str) -> tuple[PreferencePair, ...]:
    """chosen = the right summary; rejected = a worse one (see _rejected)."""
    pairs = sft_pairs(split)
    return tuple(PreferencePair(p.name, p.prompt, p.response, _rejected(pairs, i)) for i, p in enumerate(pairs))


def encode_pair(
    prompt: str, response: str, max_len: int, tokenizer: Tokenizer | None = None
) -> tuple[list[int], list[bool]]:
    """BOS prompt SEP response EOS, at most `max_len` tokens (the response is cut first);
    the mask is True on response tokens and EOS, the only ones SFT is trained on."""
    t = tokenizer or BYTE_TOKENIZER
    p = [t.bos, *t.encode(prompt)[: max_len // 2], t.sep]
    r = (t.encode(response) + [t.eos])[: max(1, max_len - len(p))]
    return p + r, [False] * len(p) + [True] * len(r)


def _pad(
    seqs: list[list[int]], masks: list[list[bool]], length: int, pad: int = PAD
) -> tuple[torch.Tensor, torch.Tensor]:
    toks = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        toks[i, : len(s)] = torch.tensor(s)
        mask[i, : len(m)] = torch.tensor(m)
    return toks, mask  # (B, L) right-padded


def _pick(n_items: int, *key: object, batch_size: int) -> list[int]:
    return [int(i) for i in _rng(*key).integers(0, n_items, batch_size)]


def _pick_share(n_items: int, kind: str, seed: int, batch_index: int, rank: int, split: str,
                batch_size: int, world_size: int | None) -> list[int]:
    """Items of an instruction batch. Without `world_size`: `batch_size` draws keyed on the
    rank (the per-rank layout). With it: the global batch (`batch_size` draws keyed as rank 0's
    of one) and rank `rank`'s share of it (`local_share`): the same items at any world size,
    and at one rank the same as the per-rank layout."""
    if world_size is None:
        return _pick(n_items, kind, seed, batch_index, rank, split, batch_size=batch_size)
    lo, hi = local_share(rank, world_size, batch_size)
    return _pick(n_items, kind, seed, batch_index, 0, split, batch_size=batch_size)[lo:hi]


def collate_sft(
    pairs: list[SFTPair], seq_len: int, tokenizer: Tokenizer | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, L) right-padded with PAD, response mask (B, L); L <= seq_len + 1
    (the model reads tokens[:, :-1], at most seq_len)."""
    pad = (tokenizer or BYTE_TOKENIZER).pad
    enc = [encode_pair(p.prompt, p.response, seq_len + 1, tokenizer) for p in pairs]
    return _pad([e[0] for e in enc], [e[1] for e in enc], max(len(e[0]) for e in enc), pad)


def collate_preferences(
    pairs: list[PreferencePair], seq_len: int, tokenizer: Tokenizer | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """chosen tokens, chosen mask, rejected tokens, rejected mask: each (B, L), one shared
    L <= seq_len (a reward model reads whole sequences)."""
    pad = (tokenizer or BYTE_TOKENIZER).pad
    ch = [encode_pair(p.prompt, p.chosen, seq_len, tokenizer) for p in pairs]
    rj = [encode_pair(p.prompt, p.rejected, seq_len, tokenizer) for p in pairs]
    L = max(len(e[0]) for e in ch + rj)
    return (*_pad([e[0] for e in ch], [e[1] for e in ch], L, pad),
            *_pad([e[0] for e in rj], [e[1] for e in rj], L, pad))


def sft_batch(
    seed: int, batch_index: int, rank: int, batch_size: int, seq_len: int, split: str = "train",
    tokenizer: Tokenizer | None = None, world_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of SFT pairs, collated (see collate_sft). With `world_size`, `batch_size`
    is global and the pairs are rank `rank`'s share (see _pick_share)."""
    pairs = sft_pairs(split)
    idx = _pick_share(len(pairs), "sft", seed, batch_index, rank, split, batch_size, world_size)
    return collate_sft([pairs[i] for i in idx], seq_len, tokenizer)


def preference_batch(
    seed: int, batch_index: int, rank: int, batch_size: int, seq_len: int, split: str = "train",
    tokenizer: Tokenizer | None = None, world_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random batch of preference pairs, collated (see collate_preferences). With
    `world_size`, `batch_size` is global and the pairs are rank `rank`'s share (see _pick_share)."""
    pairs = preference_pairs(split)
    idx = _pick_share(len(pairs), "pref", seed, batch_index, rank, split, batch_size, world_size)
    return collate_preferences([pairs[i] for i in idx], seq_len, tokenizer)


def garble_responses(
    tokens: torch.Tensor, mask: torch.Tensor, *key: object, tokenizer: Tokenizer | None = None
) -> torch.Tensor:
    """Copy of `tokens` (B, L) with every masked byte replaced by a random printable one
    (EOS kept): the corrupted-batch fault for preference stages. With a non-byte tokenizer,
    every masked non-special token becomes a random ordinary token."""
    out = tokens.clone()
    if tokenizer is not None and not tokenizer.is_byte:
        specials = torch.tensor([tokenizer.bos, tokenizer.eos, tokenizer.pad, tokenizer.sep], device=tokens.device)
        where = mask & ~torch.isin(tokens, specials)
        ids = np.asarray(tokenizer.filler_ids(), dtype=np.int64)
        fill = _rng("garble_tokens", *key).integers(0, len(ids), int(where.sum()))
        out[where] = torch.from_numpy(ids[fill]).to(tokens.device)
        return out
    where = mask & (tokens < 256)
    fill = _rng("garble_tokens", *key).integers(0, len(PRINTABLE), int(where.sum()))
    out[where] = torch.from_numpy(PRINTABLE[fill].astype(np.int64)).to(tokens.device)
    return out


def prompt_batch(
    seed: int, batch_index: int, rank: int, batch_size: int, max_len: int, split: str = "train",
    tokenizer: Tokenizer | None = None, world_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts "BOS Explain X: SEP", left-padded so responses start in one column:
    tokens (B, P) and valid (B, P); P <= max_len (longer prompts keep their end). With
    `world_size`, `batch_size` is global and the prompts are rank `rank`'s share (_pick_share)."""
    t = tokenizer or BYTE_TOKENIZER
    pairs = sft_pairs(split)
    idx = _pick_share(len(pairs), "prompt", seed, batch_index, rank, split, batch_size, world_size)
    seqs = [([t.bos, *t.encode(pairs[i].prompt), t.sep])[-max_len:] for i in idx]
    P = max(len(s) for s in seqs)
    toks = torch.full((len(seqs), P), t.pad, dtype=torch.long)
    for r, s in enumerate(seqs):
        toks[r, P - len(s) :] = torch.tensor(s)
    return toks, toks != t.pad  # (B, P), (B, P)
