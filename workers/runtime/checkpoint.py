"""Checkpoints: snapshot in the step loop, write in the background, rename into place.

Layout (docs/internals.md "Checkpoint format"):
`<root>/<run>/<stage>/step-<step:08d>/{model.pt, optimizer.pt, extra.pt, rng.pt,
state.json, manifest.json}`, written as `.tmp-step-<step>-<uuid>/` and renamed.
`manifest.json` is written last: no manifest, or a checksum that does not match,
means the checkpoint does not exist.

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
from typing import Any, Callable, Protocol

import fsspec
import torch

from workers.contract import MANIFEST_NAME, MANIFEST_SCHEMA_VERSION

__all__ = [
    "CheckpointError",
    "Storage",
    "FsspecStorage",
    "storage_for",
    "Snapshot",
    "WriteResult",
    "to_cpu",
    "write_checkpoint",
    "read_manifest",
    "verify_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "apply_retention",
    "discard_after",
    "stage_root",
    "checkpoint_path",
    "CheckpointWriter",
]

DATA_FILES = ("model.pt", "optimizer.pt", "extra.pt", "rng.pt", "state.json")
PROTECTED_TAGS = ("keep", "final")


class CheckpointError(Exception):
    """A checkpoint that must not be used (incomplete, corrupt, unreadable); names the file."""


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
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open(path, "rb") as f:
            return f.read()

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


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def storage_for(url: str | Path) -> tuple[FsspecStorage, str]:
    fs, path = fsspec.core.url_to_fs(str(url))
    return FsspecStorage(fs), path.rstrip("/") or "/"


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


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _finite_metrics(metrics: dict[str, float]) -> dict[str, float | None]:
    # JSON has no NaN; a non-finite metric is stored as null (and makes the checkpoint unhealthy)
    return {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in metrics.items()}


def write_checkpoint(snap: Snapshot, root: str | Path) -> WriteResult:
    """Write `snap` under `root` atomically; returns where it landed. Synchronous."""
    t0 = time.perf_counter()
    st, base = storage_for(stage_root(root, snap.run, snap.stage))
    st.makedirs(base)
    final = st.join(base, f"step-{snap.step:08d}")
    tmp = st.join(base, f".tmp-step-{snap.step}-{uuid.uuid4().hex[:8]}")
    st.makedirs(tmp)
    payloads = {
        "model.pt": _torch_bytes(snap.model),
        "optimizer.pt": _torch_bytes(snap.optimizer),
        "extra.pt": _torch_bytes(snap.extra),
        "rng.pt": _torch_bytes(snap.rng),
        "state.json": json.dumps(snap.state, sort_keys=True).encode(),
    }
    files = {}
    for name, data in payloads.items():
        st.write_bytes(st.join(tmp, name), data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "run": snap.run,
        "stage": snap.stage,
        "stage_kind": snap.stage_kind,
        "step": snap.step,
        "batch_cursor": snap.batch_cursor,
        "created_at": time.time(),
        "files": files,
        "metrics": _finite_metrics(snap.metrics),
        "healthy": bool(snap.healthy and all(v is not None for v in _finite_metrics(snap.metrics).values())),
        "anomalies_in_window": snap.anomalies_in_window,
        "model_config": snap.model_config,
        "tags": list(snap.tags),
    }
    # the manifest is the completeness marker: written after every data file
    st.write_bytes(st.join(tmp, MANIFEST_NAME), json.dumps(manifest, indent=1, sort_keys=True).encode())
    if st.exists(final):
        # a checkpoint of the same step from a timeline abandoned by a rollback:
        # move it aside, put the new one in place, then delete the old one
        trash = st.join(base, f".trash-step-{snap.step}-{uuid.uuid4().hex[:8]}")
        st.rename(final, trash)
        st.rename(tmp, final)
        st.remove_tree(trash)
    else:
        st.rename(tmp, final)
    total = sum(f["bytes"] for f in files.values())
    return WriteResult(st.display(final), snap.step, time.perf_counter() - t0, total, tuple(snap.tags), manifest)


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


def _read_verified(path: str | Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    m = read_manifest(path)
    st, p = storage_for(path)
    blobs: dict[str, bytes] = {}
    for name, info in sorted(m["files"].items()):
        fpath = st.join(p, name)
        try:
            data = st.read_bytes(fpath)
        except FileNotFoundError:
            raise CheckpointError(f"{st.display(fpath)}: missing (listed in {MANIFEST_NAME})") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.get("sha256") or len(data) != info.get("bytes", len(data)):
            raise CheckpointError(f"{st.display(fpath)}: checksum mismatch (sha256 {digest[:12]}..., "
                                  f"manifest says {str(info.get('sha256'))[:12]}...)")
        blobs[name] = data
    return m, blobs


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Manifest present and every file's sha256 matches; returns the manifest."""
    return _read_verified(path)[0]


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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify, then load: {"model", "optimizer", "extra", "rng", "state", "manifest", "path"}."""
    m, blobs = _read_verified(path)

    def load(name: str, weights_only: bool) -> Any:
        if name not in blobs:
            raise CheckpointError(f"{m['path']}/{name}: not in the manifest")
        try:
            return torch.load(io.BytesIO(blobs[name]), map_location=map_location, weights_only=weights_only)
        except Exception as e:  # noqa: BLE001 - a verified but unloadable file is still corrupt
            raise CheckpointError(f"{m['path']}/{name}: cannot be loaded: {e}") from None

    return {
        "model": load("model.pt", True),
        "optimizer": load("optimizer.pt", True),
        # our own files, checksummed: they hold Python/numpy RNG tuples and stage objects
        "extra": load("extra.pt", False),
        "rng": load("rng.pt", False),
        "state": json.loads(blobs["state.json"]) if "state.json" in blobs else {},
        "manifest": m,
        "path": m["path"],
    }


def apply_retention(root: str | Path, keep_last: int) -> list[str]:
    """Delete complete checkpoints beyond the last `keep_last`, except those tagged keep/final
    and the newest tagged best. Returns what was deleted."""
    ckpts = list_checkpoints(root)
    keep = {c["step"] for c in ckpts[-keep_last:]}
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

    def _write(self, snap: Snapshot) -> None:
        try:
            res = write_checkpoint(snap, self.root)
            apply_retention(stage_root(self.root, snap.run, snap.stage), self.keep_last)
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

    def submit(self, snap: Snapshot) -> float:
        t0 = time.perf_counter()
        self.wait()
        stalled = time.perf_counter() - t0
        if self.asynchronous:
            self._thread = threading.Thread(target=self._write, args=(snap,), name=f"ckpt-{snap.step}", daemon=True)
            self._thread.start()
        else:
            self._write(snap)
            self._raise_pending()
        return stalled

    def wait(self) -> WriteResult | None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_pending()
        return self.last
