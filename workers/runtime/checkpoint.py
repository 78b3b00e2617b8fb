"""Checkpoints: snapshot in the step loop, write in the background, rename into place.

Layout (docs/internals.md "Checkpoint format"):
`<root>/<run>/<stage>/step-<step:08d>/{model.pt, optimizer.pt, extra.pt, rng.pt,
state.json, manifest.json}`. On a local filesystem it is written as
`.tmp-step-<step>-<uuid>/` and renamed into place; on an object store (where a rename
copies every object) it is written in place. Either way `manifest.json` comes last:
no manifest means incomplete (being written or deleted), never corrupt.

Trust: bytes are deserialized only after they match the hashes in a `CheckpointRef`,
which the supervisor recorded when the worker that wrote the checkpoint reported it
(workers/contract.py). The manifest in the folder is a completeness marker and a
description, not a trust anchor. Every file loads with `weights_only=True`.

Storage goes through a small Protocol over fsspec, so `<root>` is a local folder
or any fsspec URL (`memory://`, `file://`, `s3://` ...).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import fsspec
import torch

from trainguard.workers.contract import MANIFEST_NAME, MANIFEST_SCHEMA_VERSION, CheckpointRef

__all__ = [
    "FORMATS",
    "CheckpointError",
    "CheckpointIncomplete",
    "CheckpointCorrupt",
    "Storage",
    "FsspecStorage",
    "storage_for",
    "checkpoint_listing",
    "Snapshot",
    "WriteResult",
    "to_cpu",
    "write_checkpoint",
    "side_payloads",
    "SIDE_FILES",
    "manifest_fields",
    "checkpoint_format",
    "read_manifest",
    "ref_from_own_manifest",
    "read_verified",
    "verify_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "apply_retention",
    "discard_after",
    "stage_root",
    "checkpoint_path",
    "CheckpointWriter",
]

SIDE_FILES = ("extra.pt", "rng.pt", "state.json")  # side_payloads: in both formats
FORMATS = ("torch", "dcp")  # the manifest's "format" (absent: torch)
DATA_FILES = ("model.pt", "optimizer.pt", "extra.pt", "rng.pt", "state.json")
PROTECTED_TAGS = ("keep", "final")


class CheckpointError(Exception):
    """A checkpoint that must not be used (incomplete, corrupt, unreadable); names the file."""


class CheckpointIncomplete(CheckpointError):
    """No manifest (being written or deleted), or the folder now holds another checkpoint
    than the one recorded (a step rewritten after a rollback). Gone, not corrupt."""


class CheckpointCorrupt(CheckpointError):
    """The recorded checkpoint is there (its manifest matches) but a file is missing or its
    bytes do not match the recorded hashes."""


class Storage(Protocol):
    def join(self, *parts: str) -> str: ...
    def exists(self, path: str) -> bool: ...
    def isdir(self, path: str) -> bool: ...
    def listdir(self, path: str) -> list[str]: ...
    def makedirs(self, path: str) -> None: ...
    def write_bytes(self, path: str, data: bytes) -> None: ...
    def read_bytes(self, path: str) -> bytes: ...
    def rename(self, src: str, dst: str) -> None: ...
    def remove_tree(self, path: str) -> None: ...
    def display(self, path: str) -> str: ...
    def listing(self, path: str) -> dict[str, tuple[int, str]]: ...


class FsspecStorage:
    """Storage over any fsspec filesystem. On the local filesystem rename is os.rename (atomic)."""

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self.fs = fs
        self.local = "file" in _protocols(fs)

    def join(self, *parts: str) -> str:
        return "/".join(p.rstrip("/") if i == 0 else p.strip("/") for i, p in enumerate(parts))

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def isdir(self, path: str) -> bool:
        return self.fs.isdir(path)

    def listdir(self, path: str) -> list[str]:
        if not self.fs.exists(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def write_bytes(self, path: str, data: bytes) -> None:
        if self.local:
            with self.fs.open(path, "wb") as f:
                f.write(data)
        else:
            self.fs.pipe_file(path, data)  # one PUT (multipart when large), no buffered file object

    def read_bytes(self, path: str) -> bytes:
        if self.local:
            with self.fs.open(path, "rb") as f:
                return f.read()
        return bytes(self.fs.cat_file(path))  # one GET; open() would ask for the object's info first

    def rename(self, src: str, dst: str) -> None:
        if self.local:
            import os

            os.rename(src, dst)
        else:
            self.fs.mv(src, dst, recursive=True)

    def remove_tree(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def display(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    def listing(self, path: str) -> dict[str, tuple[int, str]]:
        """The files directly in `path`, from one listing call: name -> (size, version marker).
        The marker is what the store says changes when an object is rewritten: the ETag on S3
        (a content hash for a plain upload), else the modification time. Empty when `path` does
        not exist; other errors (an unreachable store) propagate."""
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        out: dict[str, tuple[int, str]] = {}
        for e in entries:
            if e.get("type") != "file":
                continue
            marker = next((e[k] for k in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created")
                           if e.get(k) is not None), "")
            out[str(e["name"]).rstrip("/").rsplit("/", 1)[-1]] = (int(e.get("size") or 0), str(marker))
        return out


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def storage_for(url: str | Path) -> tuple[FsspecStorage, str]:
    text = str(url)
    if "://" in text and not text.startswith("file://"):
        # No listings cache: fsspec caches a folder's listing per filesystem instance (one per
        # process), and on s3fs an object another process wrote after this one listed its folder
        # then does not exist here (exists() False, open() FileNotFoundError). Ranks, the
        # supervisor and retention all share folders across processes.
        fs, path = fsspec.core.url_to_fs(text, use_listings_cache=False)
    else:
        fs, path = fsspec.core.url_to_fs(text)
    return FsspecStorage(fs), path.rstrip("/") or "/"


def checkpoint_listing(path: str | Path) -> dict[str, tuple[int, str]]:
    """A checkpoint folder's files from one listing (no object is read): name -> (size, version
    marker: ETag or mtime). The supervisor's change signature for a folder on any storage;
    empty when the folder is gone, OSError when the storage cannot be reached."""
    st, p = storage_for(path)
    return st.listing(p)


def stage_root(root: str | Path, run_id: str, stage: str) -> str:
    """Where a stage's checkpoints live, as a URL/path string."""
    return f"{str(root).rstrip('/')}/{run_id}/{stage}"


def checkpoint_path(root: str | Path, run_id: str, stage: str, step: int) -> str:
    """Where the checkpoint of `step` lands (the form list_checkpoints reports)."""
    st, base = storage_for(stage_root(root, run_id, stage))
    return st.display(st.join(base, f"step-{step:08d}"))


def to_cpu(obj: Any) -> Any:
    """Deep copy with every tensor cloned to CPU (the in-loop part of an async save)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(v) for v in obj)
    return obj


@dataclass
class Snapshot:
    """Everything one checkpoint holds, already copied out of the training state."""

    run: str
    stage: str
    stage_kind: str
    step: int
    batch_cursor: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    extra: dict[str, Any]
    rng: dict[int, Any]  # rank -> RNG states
    state: dict[str, Any]  # JSON-able: cursor, skip list, LR state, ...
    metrics: dict[str, float] = field(default_factory=dict)
    healthy: bool = True
    anomalies_in_window: int = 0
    model_config: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class WriteResult:
    path: str
    step: int
    seconds: float
    bytes: int
    tags: tuple[str, ...]
    manifest: dict[str, Any]
    ref: CheckpointRef  # the hashes of every file, manifest included: what rank 0 reports


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _finite_metrics(metrics: dict[str, float]) -> dict[str, float | None]:
    # JSON has no NaN; a non-finite metric is stored as null (and makes the checkpoint unhealthy)
    return {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in metrics.items()}


def side_payloads(snap: Snapshot) -> dict[str, bytes]:
    """The files of a checkpoint besides the model and optimizer state, as bytes: the stage's
    extras, every rank's RNG states, and the JSON cursor/skip/LR state. The same files in both
    formats (a DCP checkpoint holds them beside DCP's own)."""
    return {  # SIDE_FILES
        "extra.pt": _torch_bytes(snap.extra),
        "rng.pt": _torch_bytes(snap.rng),
        "state.json": json.dumps(snap.state, sort_keys=True).encode(),
    }


def manifest_fields(snap: Snapshot) -> dict[str, Any]:
    """The manifest's description of `snap` (both formats), without `files`/`schema_version`."""
    metrics = _finite_metrics(snap.metrics)
    return {
        "run": snap.run,
        "stage": snap.stage,
        "stage_kind": snap.stage_kind,
        "step": snap.step,
        "batch_cursor": snap.batch_cursor,
        "metrics": metrics,
        "healthy": bool(snap.healthy and all(v is not None for v in metrics.values())),
        "anomalies_in_window": snap.anomalies_in_window,
        "model_config": snap.model_config,
        "tags": list(snap.tags),
    }


def write_checkpoint(snap: Snapshot, root: str | Path) -> WriteResult:
    """Write `snap` under `root`, manifest last; returns where it landed. Synchronous.

    Every payload must load with `torch.load(weights_only=True)`: tensors, containers and
    plain Python values only (the harness stores RNG states as tensors and lists)."""
    t0 = time.perf_counter()
    st, base = storage_for(stage_root(root, snap.run, snap.stage))
    st.makedirs(base)
    final = st.join(base, f"step-{snap.step:08d}")
    payloads = {
        "model.pt": _torch_bytes(snap.model),
        "optimizer.pt": _torch_bytes(snap.optimizer),
        **side_payloads(snap),
    }
    files = {name: _digest(data) for name, data in payloads.items()}
    manifest = {"schema_version": MANIFEST_SCHEMA_VERSION, **manifest_fields(snap), "created_at": time.time(),
                "files": files}
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
    if st.local:
        _publish_by_rename(st, base, final, snap.step, payloads, manifest_bytes)
    else:
        _publish_in_place(st, final, payloads, manifest_bytes)
    total = sum(f["bytes"] for f in files.values())
    ref = CheckpointRef(st.display(final), {**files, MANIFEST_NAME: _digest(manifest_bytes)})
    return WriteResult(st.display(final), snap.step, time.perf_counter() - t0, total, tuple(snap.tags), manifest, ref)


def _digest(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _publish_by_rename(st: FsspecStorage, base: str, final: str, step: int, payloads: dict[str, bytes],
                       manifest_bytes: bytes) -> None:
    tmp = st.join(base, f".tmp-step-{step}-{uuid.uuid4().hex[:8]}")
    st.makedirs(tmp)
    for name, data in payloads.items():
        st.write_bytes(st.join(tmp, name), data)
    # the manifest is the completeness marker: written after every data file
    st.write_bytes(st.join(tmp, MANIFEST_NAME), manifest_bytes)
    if st.exists(final):
        # a checkpoint of the same step from a timeline abandoned by a rollback:
        # move it aside, put the new one in place, then delete the old one
        trash = st.join(base, f".trash-step-{step}-{uuid.uuid4().hex[:8]}")
        st.rename(final, trash)
        st.rename(tmp, final)
        st.remove_tree(trash)
    else:
        st.rename(tmp, final)


def _publish_in_place(st: FsspecStorage, final: str, payloads: dict[str, bytes], manifest_bytes: bytes) -> None:
    """Object stores: a rename copies every object, so write in place. An old checkpoint of the
    same step loses its manifest first (incomplete from then on), the manifest comes last."""
    st.makedirs(final)
    st.remove_tree(st.join(final, MANIFEST_NAME))
    for name, data in payloads.items():
        st.write_bytes(st.join(final, name), data)
    st.write_bytes(st.join(final, MANIFEST_NAME), manifest_bytes)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the checkpoint at `path` (with "path" added); CheckpointError when absent."""
    st, p = storage_for(path)
    mpath = st.join(p, MANIFEST_NAME)
    try:
        raw = st.read_bytes(mpath)
    except FileNotFoundError:
        raise CheckpointError(f"{st.display(mpath)}: missing; the checkpoint is incomplete") from None
    except OSError as e:
        raise CheckpointError(f"{st.display(mpath)}: unreadable: {e}") from None
    try:
        m = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{st.display(mpath)}: not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("schema_version") != MANIFEST_SCHEMA_VERSION or "files" not in m:
        raise CheckpointError(f"{st.display(mpath)}: unknown schema (expected version {MANIFEST_SCHEMA_VERSION})")
    m["path"] = st.display(p)
    return m


def ref_from_own_manifest(path: str | Path) -> CheckpointRef:
    """A reference built from the folder's own manifest. Only for checkpoints the caller wrote
    itself or trusts for another reason (tests, local tools): it vouches for nothing when
    someone else can write the storage. The supervisor never uses it."""
    st, p = storage_for(path)
    raw = _read_file(st, p, MANIFEST_NAME, incomplete_if_missing=True)
    m = read_manifest(path)
    return CheckpointRef(m["path"], {**m["files"], MANIFEST_NAME: _digest(raw)})


def _read_file(st: FsspecStorage, p: str, name: str, *, incomplete_if_missing: bool) -> bytes:
    fpath = st.join(p, name)
    try:
        return st.read_bytes(fpath)
    except FileNotFoundError:
        if incomplete_if_missing:
            raise CheckpointIncomplete(f"{st.display(fpath)}: missing; the checkpoint is incomplete") from None
        raise CheckpointCorrupt(f"{st.display(fpath)}: missing (recorded when the checkpoint was written)") from None
    except OSError as e:
        raise CheckpointError(f"{st.display(fpath)}: unreadable: {e}") from None


def _check(st: FsspecStorage, p: str, name: str, data: bytes, want: dict[str, Any]) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest == want.get("sha256") and len(data) == want.get("bytes", len(data)):
        return
    where = st.display(st.join(p, name))
    if name == MANIFEST_NAME:
        raise CheckpointIncomplete(f"{where}: not the manifest recorded for this checkpoint "
                                   f"(the folder holds another checkpoint now, or is being replaced)")
    raise CheckpointCorrupt(f"{where}: checksum mismatch (sha256 {digest[:12]}..., "
                            f"recorded {str(want.get('sha256'))[:12]}...)")


def read_verified(ref: CheckpointRef, names: Iterable[str] | None = None) -> dict[str, bytes]:
    """The bytes of `names` (default: every recorded file), each checked against `ref` before it
    is returned. The manifest is checked first: a folder without it, or with another one, is
    CheckpointIncomplete; a recorded file missing or changed is CheckpointCorrupt. A file
    changing while it is read is caught too: what is returned is what was hashed."""
    st, p = storage_for(ref.path)
    if MANIFEST_NAME not in ref.files:
        raise CheckpointError(f"{ref.path}: no recorded hash for {MANIFEST_NAME}")
    manifest = _read_file(st, p, MANIFEST_NAME, incomplete_if_missing=True)
    _check(st, p, MANIFEST_NAME, manifest, ref.files[MANIFEST_NAME])
    out = {MANIFEST_NAME: manifest}
    wanted = list(ref.files) if names is None else list(names)
    for name in wanted:
        if name == MANIFEST_NAME:
            continue
        if name not in ref.files:
            raise CheckpointError(f"{st.display(st.join(p, name))}: no recorded hash for this file")
        try:
            data = _read_file(st, p, name, incomplete_if_missing=False)
            _check(st, p, name, data, ref.files[name])
        except CheckpointCorrupt:
            # Corrupt only if the recorded checkpoint is still the one there: retention deletes
            # the manifest first, and a step rewritten after a rollback brings another manifest
            _still_recorded(st, p, ref.files[MANIFEST_NAME])
            raise
        out[name] = data
    return out


def _still_recorded(st: FsspecStorage, p: str, want: dict[str, Any]) -> None:
    try:
        manifest = st.read_bytes(st.join(p, MANIFEST_NAME))
    except FileNotFoundError:
        raise CheckpointIncomplete(f"{st.display(p)}: deleted while being read") from None
    if hashlib.sha256(manifest).hexdigest() != want.get("sha256"):
        raise CheckpointIncomplete(f"{st.display(p)}: replaced by another checkpoint while being read")


def verify_checkpoint(ref: CheckpointRef) -> dict[str, Any]:
    """Every recorded file is present and matches its recorded hash; returns the manifest."""
    blobs = read_verified(ref)
    m = json.loads(blobs[MANIFEST_NAME])
    m["path"] = ref.path
    return m


def list_checkpoints(root: str | Path) -> list[dict[str, Any]]:
    """Complete checkpoints (manifest present and readable) under a stage root, by step."""
    st, p = storage_for(root)
    out = []
    for name in st.listdir(p):
        if not name.startswith("step-"):
            continue
        try:
            out.append(read_manifest(st.display(st.join(p, name))))
        except CheckpointError:
            continue
    return sorted(out, key=lambda m: m["step"])


def checkpoint_format(ref: CheckpointRef) -> str:
    """"torch" (whole `.pt` files, this module) or "dcp" (workers/runtime/dcp_store.py), from
    the manifest, verified against `ref` first."""
    manifest = json.loads(read_verified(ref, [])[MANIFEST_NAME])
    fmt = manifest.get("format", "torch")
    if fmt not in FORMATS:
        raise CheckpointError(f"{ref.path}/{MANIFEST_NAME}: unknown checkpoint format {fmt!r}")
    return str(fmt)


def load_checkpoint(ref: CheckpointRef, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify against `ref`, then load: {"model", "optimizer", "extra", "rng", "state", "manifest", "path"}.
    The "torch" format only: a DCP checkpoint loads through dcp_store (`Harness.load` routes)."""
    blobs = read_verified(ref)
    path = ref.path
    if json.loads(blobs[MANIFEST_NAME]).get("format", "torch") != "torch":
        raise CheckpointError(f"{path}: a DCP checkpoint; it loads through workers/runtime/dcp_store.py")

    def load(name: str) -> Any:
        if name not in blobs:
            raise CheckpointError(f"{path}/{name}: not among the recorded files")
        try:
            return torch.load(io.BytesIO(blobs[name]), map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a verified but unloadable file is still unusable
            raise CheckpointError(f"{path}/{name}: cannot be loaded: {e}") from None

    manifest = json.loads(blobs[MANIFEST_NAME])
    manifest["path"] = path
    return {
        "model": load("model.pt"),
        "optimizer": load("optimizer.pt"),
        "extra": load("extra.pt"),
        "rng": load("rng.pt"),
        "state": json.loads(blobs["state.json"]) if "state.json" in blobs else {},
        "manifest": manifest,
        "path": path,
    }


def apply_retention(root: str | Path, keep_last: int, protect: Iterable[int] = ()) -> list[str]:
    """Delete complete checkpoints beyond the last `keep_last`, except those tagged keep/final,
    the newest tagged best and the steps in `protect`. Returns what was deleted."""
    ckpts = list_checkpoints(root)
    keep = {c["step"] for c in ckpts[-keep_last:]} | set(protect)
    keep |= {c["step"] for c in ckpts if set(c.get("tags", [])) & set(PROTECTED_TAGS)}
    best = [c for c in ckpts if "best" in c.get("tags", [])]
    if best:
        keep.add(best[-1]["step"])
    removed = []
    for c in ckpts:
        if c["step"] not in keep:
            st, p = storage_for(c["path"])
            # delete the manifest first: a half-deleted checkpoint must not look complete
            st.remove_tree(st.join(p, MANIFEST_NAME))
            st.remove_tree(p)
            removed.append(c["path"])
    return removed


def discard_after(root: str | Path, step: int) -> list[str]:
    """Delete the checkpoints of steps after `step`: after a rollback they belong to an
    abandoned timeline (trained on batches now skipped) and must never be picked as
    "newest good". Returns what was deleted."""
    removed = []
    for c in list_checkpoints(root):
        if c["step"] > step:
            st, p = storage_for(c["path"])
            st.remove_tree(st.join(p, MANIFEST_NAME))  # incomplete first, then gone
            st.remove_tree(p)
            removed.append(c["path"])
    return removed


class CheckpointWriter:
    """Writes snapshots in a background thread, one at a time.

    `submit` returns the seconds it waited for the previous write (the stall the step
    loop sees beyond the snapshot copy). `on_written(result)` runs in the writer thread
    after the checkpoint is in place and retention ran."""

    def __init__(self, root: str | Path, *, asynchronous: bool = True, keep_last: int = 3,
                 on_written: Callable[[WriteResult], None] | None = None) -> None:
        self.root = str(root)
        self.asynchronous = asynchronous
        self.keep_last = keep_last
        self.on_written = on_written
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last: WriteResult | None = None
        self.results: list[WriteResult] = []

    def _write(self, snap: Snapshot, protect: frozenset[int] = frozenset()) -> None:
        try:
            res = write_checkpoint(snap, self.root)
            apply_retention(stage_root(self.root, snap.run, snap.stage), self.keep_last, protect)
            self.last = res
            self.results.append(res)
            if self.on_written is not None:
                self.on_written(res)
        except BaseException as e:  # noqa: BLE001 - surfaced to the step loop on the next call
            self._error = e

    def _raise_pending(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise CheckpointError(f"checkpoint write failed: {e!r}") from e

    def submit(self, snap: Snapshot, protect: frozenset[int] = frozenset()) -> float:
        """`protect`: steps retention must keep this time (beyond `keep_last`)."""
        t0 = time.perf_counter()
        self.wait()
        stalled = time.perf_counter() - t0
        if self.asynchronous:
            self._thread = threading.Thread(target=self._write, args=(snap, protect), name=f"ckpt-{snap.step}",
                                            daemon=True)
            self._thread.start()
        else:
            self._write(snap, protect)
            self._raise_pending()
        return stalled

    def wait(self) -> WriteResult | None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_pending()
        return self.last
