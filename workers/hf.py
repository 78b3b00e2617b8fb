"""Hugging Face causal LMs behind the stages' model interface, their tokenizers, and export.

A pipeline's `model.hf` (workers/spec.py `HFModelSpec`) names a local folder (weights as
safetensors, config, tokenizer; loaded with `local_files_only=True, trust_remote_code=False`)
or a fresh architecture config. `HFCausalLM` adapts the transformers model to what the
stages use from `workers.model.GPT`: `forward(idx, valid) -> logits (B, T, V)`, `hidden`,
`spec.seq_len` (for `generate`), `banned_token_ids`; `HFRewardModel` is the same backbone
with a scalar head read at the last non-pad token, like `RewardModel`. State dict keys are
`hf.*` (LM) and `backbone.hf.*` + `head.*` (reward model), so `workers.model.load_weights`
converts between them as it does for the GPT.

A fresh config has no tokenizer: a byte-level BPE is trained on the pipeline's corpora
(training split, fixed order; deterministic) and saved under `<state_dir>/runs/<run>/tokenizer`
with a manifest of the sha256 of every file (written last, published by an atomic rename),
so restarts and later stages read the same one, verified before it is parsed.

transformers is imported only inside functions here: the built-in GPT path and the
supervisor never pay its import time. The Ray workers run with OFFLINE_ENV
(workers/group.py), so nothing here can reach the Hub.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainguard.workers.spec import HF_OFFLINE_ENV
from trainguard.workers.tokenizer import Tokenizer

__all__ = [
    "OFFLINE_ENV",
    "SPECIAL_TOKENS",
    "HFTokenizer",
    "HFCausalLM",
    "HFRewardModel",
    "train_bpe_tokenizer",
    "tokenizer_dir",
    "TOKENIZER_MANIFEST",
    "TokenizerIntegrityError",
    "write_tokenizer_manifest",
    "read_verified_tokenizer",
    "stage_tokenizer",
    "load_hf_tokenizer",
    "build_hf_lm",
    "build_hf_reward_model",
    "export_hf",
]

OFFLINE_ENV = HF_OFFLINE_ENV
SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "sep_token": "<sep>"}
ATTN_IMPLEMENTATION = "eager"  # no NaN for a fully padded query row; tiny models on CPU
TOKENIZER_TRAIN_CHARS = 600_000  # enough text for a few hundred merges, trained in about a second


def _offline() -> None:
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


# ---------------------------------------------------------------- tokenizers


class HFTokenizer(Tokenizer):
    """A `transformers.PreTrainedTokenizerFast` as a workers.tokenizer.Tokenizer."""

    is_byte = False

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self._t = tok.backend_tokenizer
        if tok.bos_token_id is None or tok.eos_token_id is None:
            raise ValueError("the model's tokenizer needs a BOS and an EOS token")
        self.bos = int(tok.bos_token_id)
        self.eos = int(tok.eos_token_id)
        self.pad = int(tok.pad_token_id) if tok.pad_token_id is not None else self.eos
        self.sep = int(tok.sep_token_id) if tok.sep_token_id is not None else self.eos
        self.vocab_size = len(tok)
        bel = self._t.encode("\x07", add_special_tokens=False).ids
        self.rare = int(bel[0]) if len(bel) == 1 else self.vocab_size - 1
        self.key = "hf-" + hashlib.sha256(self._t.to_str().encode()).hexdigest()[:16]
        self._specials = {self.bos, self.eos, self.pad, self.sep, *(int(i) for i in tok.all_special_ids)}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(self._t.encode(text, add_special_tokens=False).ids)
        return ([self.bos] if bos else []) + ids + ([self.eos] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._t.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def filler_ids(self) -> list[int]:
        return [i for i in range(self.vocab_size) if i not in self._specials]


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE (`PreTrainedTokenizerFast`, specials <bos> <eos> <pad> <sep>) trained on
    `texts` (cut to TOKENIZER_TRAIN_CHARS in order); a function of its arguments alone."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    picked, total = [], 0
    for t in texts:
        if total >= TOKENIZER_TRAIN_CHARS:
            break
        picked.append(t)
        total += len(t)
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(picked, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, **SPECIAL_TOKENS)


def tokenizer_dir(state_dir: str | Path, run_id: str) -> Path:
    """Where a fresh-config run keeps its trained tokenizer (with its manifest,
    TOKENIZER_MANIFEST, inside: see `stage_tokenizer`)."""
    return Path(state_dir) / "runs" / run_id / "tokenizer"


TOKENIZER_MANIFEST = "tokenizer.manifest.json"
TOKENIZER_MANIFEST_FORMAT = 1


class TokenizerIntegrityError(ValueError):
    """A run's trained tokenizer folder does not match its manifest (or has none): never loaded."""


def _is_run_tokenizer_folder(folder: Path) -> bool:
    """`<state>/runs/<run>/tokenizer`: the only place a trained tokenizer is saved."""
    return folder.name == "tokenizer" and folder.parent.parent.name == "runs"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_tokenizer_manifest(folder: str | Path) -> dict[str, Any]:
    """Write TOKENIZER_MANIFEST into `folder`, last: the sha256 and size of every other file
    there (a flat folder, as `save_pretrained` writes it), and `digest`, the sha256 of the
    canonical JSON of that file table (one hash that names the whole tokenizer)."""
    folder = Path(folder)
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.iterdir()):
        if p.name == TOKENIZER_MANIFEST:
            continue
        if not p.is_file() or p.is_symlink():
            raise TokenizerIntegrityError(f"{p}: not a plain file; a tokenizer folder holds plain files only")
        with open(p, "rb") as f:
            data = f.read()
            os.fsync(f.fileno())  # on disk before the manifest that vouches for it
        files[p.name] = {"sha256": _sha256(data), "bytes": len(data)}
    manifest = {"format": TOKENIZER_MANIFEST_FORMAT, "files": files, "digest": _files_digest(files)}
    tmp = folder / f".{TOKENIZER_MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, folder / TOKENIZER_MANIFEST)
    _fsync_dir(folder)
    return manifest


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files_digest(files: dict[str, dict[str, Any]]) -> str:
    return _sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode())


def read_verified_tokenizer(folder: str | Path) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The bytes of every file of a trained tokenizer folder, checked against its manifest
    before anything is parsed: ({name: bytes}, manifest). Refused, naming the file: a missing
    or unreadable manifest, a listed file missing or changed (size or sha256), a file the
    manifest does not list (or anything other than a plain file)."""
    folder = Path(folder)
    mpath = folder / TOKENIZER_MANIFEST
    try:
        manifest = json.loads(mpath.read_bytes())
        files = manifest["files"]
        if manifest.get("format") != TOKENIZER_MANIFEST_FORMAT or not isinstance(files, dict) or not files:
            raise ValueError("unknown format or no files")
    except FileNotFoundError:
        raise TokenizerIntegrityError(
            f"{mpath}: missing; the tokenizer in {folder} is incomplete or was not saved by trainguard, "
            "refusing to load it (delete the folder to train it again: training is deterministic)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TokenizerIntegrityError(f"{mpath}: unreadable tokenizer manifest ({e}); refusing to load") from None
    if manifest.get("digest") != _files_digest(files):
        raise TokenizerIntegrityError(f"{mpath}: its digest does not match its file table; refusing to load")
    out: dict[str, bytes] = {}
    for name, entry in sorted(files.items()):
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise TokenizerIntegrityError(f"{mpath}: bad file name {name!r} in the manifest; refusing to load")
        p = folder / name
        if p.is_symlink() or not p.is_file():
            raise TokenizerIntegrityError(f"{p}: listed in the tokenizer manifest but missing (or not a plain file)")
        data = p.read_bytes()
        if len(data) != entry.get("bytes") or _sha256(data) != entry.get("sha256"):
            raise TokenizerIntegrityError(f"{p}: sha256 mismatch against {TOKENIZER_MANIFEST}; the tokenizer "
                                          "was changed after it was saved, refusing to load it")
        out[name] = data
    extra = sorted(p.name for p in folder.iterdir() if p.name != TOKENIZER_MANIFEST and p.name not in files)
    if extra:
        raise TokenizerIntegrityError(f"{folder / extra[0]}: not in the tokenizer manifest"
                                      + (f" (nor {len(extra) - 1} more)" if len(extra) > 1 else "")
                                      + "; refusing to load")
    return out, manifest


def load_hf_tokenizer(folder: str | Path, *, verify: bool | None = None) -> Any:
    """A fast tokenizer from `folder`, parsed with local files only and no remote code.

    `verify` (default: when `folder` is a run's trained tokenizer, `<state>/runs/<run>/tokenizer`,
    or holds a TOKENIZER_MANIFEST): every file is read once and checked against the manifest
    (`read_verified_tokenizer`) and the verified bytes are parsed from a private copy, so a file
    changed between the check and the parse is never what gets loaded. A model folder given by
    the pipeline (`model.hf.path`) has no manifest and is read as it is."""
    _offline()
    from transformers import AutoTokenizer

    folder = Path(folder)
    if verify is None:
        verify = _is_run_tokenizer_folder(folder) or (folder / TOKENIZER_MANIFEST).exists()
    kw = dict(local_files_only=True, trust_remote_code=False, use_fast=True)
    if not verify:
        tok = AutoTokenizer.from_pretrained(str(folder), **kw)
    else:
        files, _ = read_verified_tokenizer(folder)
        with tempfile.TemporaryDirectory(prefix="trainguard-tokenizer-") as private:
            for name, data in files.items():
                (Path(private) / name).write_bytes(data)
            tok = AutoTokenizer.from_pretrained(private, **kw)
        with contextlib.suppress(AttributeError):
            tok.name_or_path = str(folder)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"the tokenizer in {folder} is not a fast (tokenizers) tokenizer")
    return tok


def stage_tokenizer(model_spec: Any, data_files: dict[str, str], run_id: str,
                    state_dir: str | Path | None) -> HFTokenizer:
    """The tokenizer of an HF-model pipeline: the model folder's, or the run's trained BPE.

    The trained BPE is kept like a checkpoint: trained on first use, saved with
    `save_pretrained` into a private temporary folder, TOKENIZER_MANIFEST (sha256 of every file)
    written last into it, then published by one atomic rename to `<state>/runs/<run>/tokenizer`
    — so the folder either does not exist or is complete with its manifest. Every later
    load (other ranks, later stages, resumes, export) verifies every file against the manifest
    before parsing (`load_hf_tokenizer`) and refuses a changed, missing or extra file, or a
    folder without a manifest (which this code never publishes).

    Ranks race to train it: each trains the same tokenizer (a function of the corpora and the
    vocabulary size) and tries the rename; the losers' renames fail on the existing folder,
    and each loser checks that its own manifest equals the published one (a rank on another
    `tokenizers` version would train a different tokenizer: refused rather than trained on).

    Trust: the manifest sits beside the files it vouches for, in the run's state folder, so a
    worker (or anyone) able to rewrite the folder could rewrite the manifest too; it catches
    corruption, partial copies and edits that do not also forge the manifest. Recording the
    manifest's `digest` where workers cannot rewrite it alone — the supervisor's store, as for
    checkpoint hashes — is not done yet (out of this change's scope)."""
    hf = model_spec.hf
    if hf.path is not None:
        return HFTokenizer(load_hf_tokenizer(hf.path, verify=False))
    folder = tokenizer_dir(state_dir, run_id) if state_dir is not None else None
    if folder is not None and folder.exists():
        return HFTokenizer(load_hf_tokenizer(folder, verify=True))
    from trainguard.workers.data import tokenizer_training_texts

    tok = train_bpe_tokenizer(tokenizer_training_texts(data_files), hf.tokenizer_vocab_size)
    if folder is not None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".tmp-tokenizer-{uuid.uuid4().hex}"
        try:
            tok.save_pretrained(str(tmp))
            mine = write_tokenizer_manifest(tmp)
            try:
                os.rename(tmp, folder)  # atomic publish; fails if another rank published first
                _fsync_dir(folder.parent)
                return HFTokenizer(tok)
            except OSError:
                if not folder.is_dir():
                    raise
            _, theirs = read_verified_tokenizer(folder)
            if theirs["digest"] != mine["digest"]:
                raise TokenizerIntegrityError(
                    f"{folder / TOKENIZER_MANIFEST}: the published tokenizer differs from the one this rank "
                    "trained on the same corpora (tokenizers versions differ between workers?); refusing to train")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return HFTokenizer(tok)


# ---------------------------------------------------------------- models


class HFCausalLM(nn.Module):
    """A transformers causal LM with the GPT's interface: `forward(idx, valid) -> (B, T, V)`."""

    is_causal_lm = True

    def __init__(self, hf_model: nn.Module, spec: Any, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.hf = hf_model
        self.spec = spec  # workers.spec.ModelSpec: seq_len bounds the window
        self.vocab_size = int(hf_model.config.vocab_size)
        self.banned_token_ids = tuple(sorted({tokenizer.bos, tokenizer.pad, tokenizer.sep} - {tokenizer.eos}))
        self.pad_id = tokenizer.pad

    def hidden(self, idx: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Final-layer states (B, T, D); with `valid` (B, T) pads are not attended to and positions
        restart at the first real token, as in GPT.hidden."""
        T = idx.shape[1]
        if T > self.spec.seq_len:
            raise ValueError(f"sequence length {T} exceeds model.seq_len {self.spec.seq_len}")
        if valid is None:
            out = self.hf.base_model(input_ids=idx, use_cache=False)
        else:
            pos = (valid.long().cumsum(1) - 1).clamp(min=0)
            out = self.hf.base_model(input_ids=idx, attention_mask=valid.long(), position_ids=pos, use_cache=False)
        return out.last_hidden_state

    def forward(self, idx: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.hf.get_output_embeddings()(self.hidden(idx, valid))  # (B, T, V)


class HFRewardModel(nn.Module):
    """HFCausalLM backbone + scalar head read at the last non-pad token: `forward(idx) -> (B,)`."""

    is_reward_model = True

    def __init__(self, backbone: HFCausalLM) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.hf.config.hidden_size), 1)

    def forward(self, idx: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        h = self.backbone.hidden(idx, valid)  # (B, T, D)
        nonpad = idx != self.backbone.pad_id if valid is None else valid
        pos = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
        last = torch.where(nonpad, pos, torch.zeros_like(pos)).amax(dim=1)  # (B,)
        h_last = h[torch.arange(idx.shape[0], device=idx.device), last]  # (B, D)
        return self.head(h_last).squeeze(-1).float()  # (B,)


def _fresh_config(hf: Any, tokenizer: Tokenizer, seq_len: int) -> Any:
    from transformers import AutoConfig

    kw = {k: v for k, v in (hf.config or {}).items() if k != "architecture"}
    kw.setdefault("max_position_embeddings", seq_len)
    return AutoConfig.for_model(hf.config["architecture"], vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos,
                                eos_token_id=tokenizer.eos, pad_token_id=tokenizer.pad, **kw)


def _hf_module(model_spec: Any, tokenizer: Tokenizer, seed: int) -> nn.Module:
    """The transformers model: the folder's weights, or a fresh one whose weights depend on `seed` alone."""
    _offline()
    from transformers import AutoModelForCausalLM

    hf = model_spec.hf
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % 2**63)
        if hf.path is not None:
            if not Path(hf.path).is_dir():
                raise ValueError(f"model.hf.path {hf.path!r} is not a folder")
            model = AutoModelForCausalLM.from_pretrained(
                hf.path, local_files_only=True, trust_remote_code=False, use_safetensors=True,
                attn_implementation=ATTN_IMPLEMENTATION)
        else:
            model = AutoModelForCausalLM.from_config(_fresh_config(hf, tokenizer, model_spec.seq_len),
                                                     attn_implementation=ATTN_IMPLEMENTATION)
    if int(model.config.vocab_size) < tokenizer.vocab_size:
        raise ValueError(f"the model's vocab_size ({model.config.vocab_size}) is below its tokenizer's ({tokenizer.vocab_size})")
    model.config.use_cache = False
    return model.float().train()


def build_hf_lm(model_spec: Any, tokenizer: Tokenizer, seed: int, device: torch.device | str = "cpu") -> HFCausalLM:
    return HFCausalLM(_hf_module(model_spec, tokenizer, seed), model_spec, tokenizer).to(device)


def build_hf_reward_model(model_spec: Any, tokenizer: Tokenizer, seed: int,
                          device: torch.device | str = "cpu") -> HFRewardModel:
    rm = HFRewardModel(HFCausalLM(_hf_module(model_spec, tokenizer, seed), model_spec, tokenizer))
    with torch.no_grad():
        rm.head.weight.zero_()  # every reward starts at 0, as RewardModel's
        rm.head.bias.zero_()
    return rm.to(device)


# ---------------------------------------------------------------- export


def export_hf(model_spec: Any, state: dict[str, torch.Tensor], tokenizer_folder: str | Path, out_dir: str | Path) -> Path:
    """Write `state` (a checkpoint's model.pt: an HFCausalLM's or an HFRewardModel's, whose
    backbone is exported) as a Hugging Face folder: config, safetensors weights, tokenizer."""
    tok = load_hf_tokenizer(tokenizer_folder)
    tokenizer = HFTokenizer(tok)
    prefix = "backbone.hf." if any(k.startswith("backbone.") for k in state) else "hf."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError("the checkpoint holds no Hugging Face model weights")
    model = _hf_module(model_spec, tokenizer, 0)
    model.load_state_dict(weights)
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out
