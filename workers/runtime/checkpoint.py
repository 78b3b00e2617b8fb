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

Digests: every file is recorded as `{"blake3": hex, "bytes": n}` (`DIGEST`; BLAKE3 is
cryptographic and 3–4x sha256's speed on one core here, so the hash no longer bounds the write).
Entries recorded as `{"sha256": hex, "bytes": n}` (checkpoints written before BLAKE3) still
verify; `digest_mismatch` is the one check every reader uses (this module, dcp_store).

Storage goes through a small Protocol over fsspec, so `<root>` is a local folder
or any fsspec URL (`memory://`, `file://`, `s3://` ...).

Cost in the step loop (`CheckpointWriter.stage` + `submit`): the state is copied into CPU
buffers reused from one checkpoint to the next (pinned, non-blocking copies from a GPU); with
`until=optimizer` the CPU copy is made by the writer thread and the optimizer's next `step` waits
for it. In the background each file is serialised straight into storage and hashed in the same pass
(no in-memory copy of the bytes; large chunks hashed in a helper thread while they are written).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import queue
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Protocol

import blake3
import fsspec
import torch

from trainguard.workers.contract import MANIFEST_NAME, MANIFEST_SCHEMA_VERSION, CheckpointRef

__all__ = [
    "FORMATS",
    "DIGEST",
    "new_hasher",
    "digest_record",
    "file_digest",
    "digest_mismatch",
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
    "StagingBuffers",
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

DIGEST = "blake3"  # the per-file hash new checkpoints record: {"blake3": hex, "bytes": n}
# what a recorded entry may carry, in the order they are checked: sha256 is what checkpoints
# written before BLAKE3 recorded (still loadable and verifiable)
_VERIFIABLE: dict[str, Callable[[bytes], Any]] = {"blake3": blake3.blake3, "sha256": hashlib.sha256}


def new_hasher() -> blake3.blake3:
    """An incremental hasher of `DIGEST` (`update(bytes)`; BLAKE3 lets the GIL go on large inputs)."""
    return blake3.blake3()


def digest_record(hasher: blake3.blake3, nbytes: int) -> dict[str, Any]:
    """A file's entry in a manifest and a `CheckpointRef`: {"blake3": hex, "bytes": n}."""
    return {DIGEST: hasher.hexdigest(), "bytes": nbytes}


def file_digest(data: bytes) -> dict[str, Any]:
    """The recorded entry of `data` (`digest_record`)."""
    return digest_record(blake3.blake3(data), len(data))


def digest_mismatch(data: bytes, want: Any) -> str | None:
    """Checks `data` against a recorded entry ({"blake3" or "sha256": hex, "bytes": n}): None
    when it matches, else what differs (for an error message). An entry carrying neither digest
    (or not a mapping) raises ValueError: nothing can vouch for the bytes. The one check every
    reader of checkpoint files uses (`read_verified`, and through it dcp_store)."""
    algo = next((a for a in _VERIFIABLE if isinstance(want, dict) and isinstance(want.get(a), str)), None)
    if algo is None:
        keys = sorted(want) if isinstance(want, dict) else type(want).__name__
        raise ValueError(f"the recorded entry carries no digest this version can check "
                         f"(has {keys}; expected one of {', '.join(_VERIFIABLE)})")
    size = want.get("bytes", len(data))
    if len(data) != size:
        return f"size {len(data)} bytes, recorded {size}"
    got = _VERIFIABLE[algo](data).hexdigest()
    if got != want[algo]:
        return f"{algo} {got[:12]}..., recorded {str(want[algo])[:12]}..."
    return None


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
    def open_write(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...
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
            with open(path, "wb") as f:
                f.write(data)
        else:
            self.fs.pipe_file(path, data)  # one PUT (multipart when large), no buffered file object

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[IO[bytes]]:
        """A binary file to stream `path`'s bytes into; complete once the block exits normally.
        Local: a plain `open()` (fsspec's LocalFileOpener adds a Python layer to every write).
        Object stores: fsspec's buffered upload (s3fs: one PUT below its block size, multipart
        above); on an error the upload is discarded rather than completed."""
        if self.local:
            with open(path, "wb") as f:
                yield f
            return
        f = self.fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()  # s3fs: abort the multipart upload, if one was started
            with contextlib.suppress(Exception):
                f.closed = True  # fsspec's buffered files: close() (or __del__) would upload the rest
            raise
        f.close()

    def read_bytes(self, path: str) -> bytes:
        if self.local:
            with self.fs.open(path, "rb") as f:
                return f.read()
        return bytes(self.fs.cat_file(path))  # one GET; open() would ask for the object's info first

    def rename(self, src: str, dst: str) -> None:
        if self.local:
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
    """Deep copy with every tensor cloned to CPU, into fresh memory (`StagingBuffers.copy` reuses
    its buffers instead: what the step loop uses for the model and optimizer state)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(v) for v in obj)
    return obj


_hash_pool: ThreadPoolExecutor | None = None  # hashing beside the writes (_HashingWriter)
_hash_pool_lock = threading.Lock()


def _hasher() -> ThreadPoolExecutor:
    """The process's one helper thread that hashes large chunks while they are written, started
    on first use (writers in one process take turns on it)."""
    global _hash_pool
    with _hash_pool_lock:
        if _hash_pool is None:
            _hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-hash")
        return _hash_pool


def _forget_hasher() -> None:
    # a forked child (a DataLoader worker) has none of the parent's threads, and the lock may
    # have been held by one of them: it starts afresh should it ever write a checkpoint
    global _hash_pool, _hash_pool_lock
    _hash_pool, _hash_pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_hasher)


class StagingBuffers:
    """CPU copies of training state, in buffers reused from one checkpoint to the next (the
    "staging" of DCP's async save). `copy(obj)` returns `obj` with every tensor replaced by a CPU
    buffer holding its values: the buffer the previous `copy` used at the same place in `obj`
    when shape and dtype still match, else a new one. Tensors that are the same view of the same
    memory (tied weights) share one buffer, as they share their storage in a `torch.save` of the
    live state dict.

    Where the copies run:
    - CUDA tensors: into pinned buffers, non-blocking, on the current stream (so ordered before
      any later update of the source); `wait()` waits for them.
    - CPU tensors whose `data_ptr()` is in `defer`: by the first thread to call `wait()` (the
      checkpoint writer's, normally), the others waiting for it. The caller must not change
      those tensors before a `wait()` returns (CheckpointWriter.stage: the optimizer's
      parameters and state, until its next `step`).
    - other CPU tensors: copied before `copy` returns.

    The caller guarantees that whatever read the previous `copy`'s result is done
    (`CheckpointWriter.stage` waits for the previous write first)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[Any, ...], torch.Tensor] = {}
        self._events: list[Any] = []
        self._pending: _Deferred | None = None
        self.allocated = 0  # buffers allocated so far: after the first copy, only for new shapes

    def copy(self, obj: Any, defer: set[int] | frozenset[int] = frozenset()) -> Any:
        for ev in self._events:  # the buffers are about to be refilled: nothing may still write them
            ev.synchronize()
        if self._pending is not None:
            self._pending.drop()
        self._pending, self._events = None, []
        bufs: dict[tuple[Any, ...], torch.Tensor] = {}
        shared: dict[tuple[Any, ...], torch.Tensor] = {}
        streams: set[Any] = set()
        deferred: list[tuple[torch.Tensor, torch.Tensor]] = []
        out = self._copy(obj, (), _Walk(bufs, shared, streams, deferred, defer))
        self._bufs = bufs  # buffers for places no longer in `obj` are let go
        for stream in streams:  # one event per CUDA stream copied on
            ev = torch.cuda.Event()
            ev.record(stream)
            self._events.append(ev)
        if deferred:
            self._pending = _Deferred(deferred)
        return out

    @property
    def deferred_pending(self) -> bool:
        """Whether deferred copies of the last `copy` may still be outstanding."""
        return self._pending is not None and not self._pending.done.is_set()

    def wait(self, *, device: bool = True) -> None:
        """Until the copies of the last `copy` are done, running the deferred ones if no other
        thread has begun them (`device=False`: not the CUDA ones); raises what a deferred copy
        raised. Any thread, any number of times."""
        if device:
            for ev in list(self._events):
                ev.synchronize()
        if self._pending is not None:
            self._pending.run()

    def _copy(self, obj: Any, where: tuple[Any, ...], walk: "_Walk") -> Any:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, where, walk)
        if isinstance(obj, dict):
            return {k: self._copy(v, (*where, k), walk) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._copy(v, (*where, i), walk) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(self._copy(v, (*where, i), walk) for i, v in enumerate(obj))
        return obj

    def _tensor(self, t: torch.Tensor, where: tuple[Any, ...], walk: "_Walk") -> torch.Tensor:
        if t.requires_grad:
            t = t.detach()
        if type(t) not in _PLAIN or t.layout != torch.strided or t.is_meta:
            return t.detach().to("cpu", copy=True)  # subclasses (DTensor ...), sparse: a fresh copy
        ptr, cuda = t.data_ptr(), t.is_cuda
        view = (ptr, cuda, t.shape, t.stride(), t.dtype)
        if ptr != 0 and view in walk.shared:
            return walk.shared[view]
        buf = self._bufs.get(where)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=cuda)
            self.allocated += 1
        if cuda:
            buf.copy_(t, non_blocking=True)
            walk.streams.add(torch.cuda.current_stream(t.device))
        elif ptr in walk.defer:
            walk.deferred.append((buf, t))
        else:
            buf.copy_(t)
        walk.bufs[where] = buf
        walk.shared[view] = buf
        return buf


@dataclass
class _Walk:
    bufs: dict[tuple[Any, ...], torch.Tensor]
    shared: dict[tuple[Any, ...], torch.Tensor]
    streams: set[Any]
    deferred: list[tuple[torch.Tensor, torch.Tensor]]
    defer: set[int] | frozenset[int]


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _copy_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    # one call, so the GIL is let go once for all of them, not taken back between tensors
    torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])


class _Deferred:
    """Copies made once, by the first thread that asks; the others wait until they are done."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.pairs = pairs
        self.claimed = threading.Lock()
        self.done = threading.Event()
        self.error: BaseException | None = None

    def drop(self) -> None:
        """Not needed any more (its buffers are about to be refilled): unmade, or waited for."""
        if self.claimed.acquire(blocking=False):
            self.pairs = []
            self.done.set()
        else:
            self.done.wait()

    def run(self) -> None:
        if self.claimed.acquire(blocking=False):
            try:
                _copy_pairs(self.pairs)
            except BaseException as e:  # noqa: BLE001 - raised to every waiter
                self.error = e
            finally:
                self.pairs = []
                self.done.set()
        else:
            self.done.wait()
        if self.error is not None:
            raise self.error


def _updated_by(optimizer: torch.optim.Optimizer) -> set[int]:
    """Where `optimizer`'s parameters and state tensors start (`data_ptr`): what its `step`
    changes. (A state dict holds them as they are, or detached: the same memory.)"""
    out = {p.data_ptr() for g in optimizer.param_groups for p in g["params"]}
    for st in optimizer.state.values():
        out.update(v.data_ptr() for v in st.values() if isinstance(v, torch.Tensor))
    out.discard(0)
    return out


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


def _crc_free_save_supported() -> bool:
    """Whether torch's zip writer and `_save` still take the arguments `_torch_save` passes (as
    torch.save itself does in torch 2.13: `PyTorchFileWriter(file, compute_crc32, alignment)`,
    `_save(obj, zip_file, pickle_module, pickle_protocol, _disable_byteorder_record)`)."""
    try:
        params = list(inspect.signature(torch.serialization._save).parameters)
        return callable(torch._C.PyTorchFileWriter) and callable(torch.serialization._get_storage_alignment) and \
            params == ["obj", "zip_file", "pickle_module", "pickle_protocol", "_disable_byteorder_record"]
    except (AttributeError, TypeError, ValueError):
        return False


_CRC_FREE_SAVE = _crc_free_save_supported()


def _torch_save(obj: Any, f: Any) -> None:
    """`torch.save(obj, f)` without the zip format's CRC-32 of every record: the BLAKE3 digest of the
    whole file, recorded when it is written and checked before anything is loaded, is what
    vouches for the bytes, and the CRC costs about as much as the serialisation itself.
    `torch.load` reads the file the same (it does not check the CRCs; see torch's
    `set_crc32_options`, which would do the same process-wide). Private torch API, checked once
    at import: should torch's writer or `_save` take other arguments, plain `torch.save`
    (torch is pinned; tests/unit/workers/test_runtime_checkpoint.py compares the two outputs)."""
    if not _CRC_FREE_SAVE:
        torch.save(obj, f)
        return
    writer = torch._C.PyTorchFileWriter(f, False, torch.serialization._get_storage_alignment())
    try:
        torch.serialization._save(obj, writer, pickle, torch.serialization.DEFAULT_PROTOCOL, False)
    finally:  # as torch.save's context manager does, error or not (else its destructor would, late)
        writer.write_end_of_file()
    f.flush()


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    _torch_save(obj, buf)
    return buf.getvalue()


# Chunks at least this large (a tensor's bytes, as torch's writer hands them over) are hashed in
# a helper thread while the writing thread writes them: BLAKE3 and file writes release the GIL.
_OVERLAP_MIN = 256 * 1024


class _HashingWriter:
    """A write-only binary file over `raw` that computes the digest (`DIGEST`) and size of what is
    written through it, in the same pass: large chunks are hashed (helper thread) while they are
    written."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.hasher = new_hasher()
        self.bytes = 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        if n >= _OVERLAP_MIN:
            hashed = _hasher().submit(self.hasher.update, data)
            try:
                self.raw.write(data)
            finally:
                hashed.result()
        else:
            self.hasher.update(data)
            self.raw.write(data)
        self.bytes += n
        return n

    def flush(self) -> None:
        self.raw.flush()

    def digest(self) -> dict[str, Any]:
        return digest_record(self.hasher, self.bytes)


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

    Each file is streamed to storage as it is serialised, hashed in the same pass (no copy of
    the state in memory); the manifest records those hashes. On a local filesystem the files go
    to a temporary folder renamed into place; on an object store (where a rename copies every
    object) in place, an old checkpoint of the same step losing its manifest first.

    Every payload must load with `torch.load(weights_only=True)`: tensors, containers and
    plain Python values only (the harness stores RNG states as tensors and lists)."""
    t0 = time.perf_counter()
    st, base = storage_for(stage_root(root, snap.run, snap.stage))
    st.makedirs(base)
    final = st.join(base, f"step-{snap.step:08d}")
    if st.local:
        folder = st.join(base, f".tmp-step-{snap.step}-{uuid.uuid4().hex[:8]}")
    else:
        folder = final
        st.makedirs(final)
        st.remove_tree(st.join(final, MANIFEST_NAME))  # an older checkpoint of this step: incomplete now
    st.makedirs(folder)
    try:
        files = {name: _save_hashed(st, st.join(folder, name), obj)
                 for name, obj in (("model.pt", snap.model), ("optimizer.pt", snap.optimizer))}
        for name, data in side_payloads(snap).items():
            st.write_bytes(st.join(folder, name), data)
            files[name] = file_digest(data)
        manifest = {"schema_version": MANIFEST_SCHEMA_VERSION, **manifest_fields(snap), "created_at": time.time(),
                    "files": files}
        manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
        # the manifest is the completeness marker: written after every data file
        st.write_bytes(st.join(folder, MANIFEST_NAME), manifest_bytes)
    except BaseException:
        if st.local:  # an object store's partial files stay behind without a manifest: incomplete
            with contextlib.suppress(OSError):
                st.remove_tree(folder)
        raise
    if st.local:
        _publish_by_rename(st, base, folder, final, snap.step)
    total = sum(f["bytes"] for f in files.values())
    ref = CheckpointRef(st.display(final), {**files, MANIFEST_NAME: file_digest(manifest_bytes)})
    return WriteResult(st.display(final), snap.step, time.perf_counter() - t0, total, tuple(snap.tags), manifest, ref)


def _save_hashed(st: FsspecStorage, path: str, obj: Any) -> dict[str, Any]:
    """Serialise `obj` straight into `path`, hashing the bytes as they go: {"blake3", "bytes"}."""
    with st.open_write(path) as f:
        out = _HashingWriter(f)
        _torch_save(obj, out)
    return out.digest()


def _publish_by_rename(st: FsspecStorage, base: str, tmp: str, final: str, step: int) -> None:
    if st.exists(final):
        # a checkpoint of the same step from a timeline abandoned by a rollback:
        # move it aside, put the new one in place, then delete the old one
        trash = st.join(base, f".trash-step-{step}-{uuid.uuid4().hex[:8]}")
        st.rename(final, trash)
        st.rename(tmp, final)
        st.remove_tree(trash)
    else:
        st.rename(tmp, final)


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
    return CheckpointRef(m["path"], {**m["files"], MANIFEST_NAME: file_digest(raw)})


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


def _mismatch(st: FsspecStorage, p: str, name: str, data: bytes, want: Any) -> str | None:
    """`digest_mismatch`, with a recorded entry it cannot check refused as a CheckpointError."""
    try:
        return digest_mismatch(data, want)
    except ValueError as e:
        raise CheckpointError(f"{st.display(st.join(p, name))}: {e}; refused (nothing deserialized)") from None


def _check(st: FsspecStorage, p: str, name: str, data: bytes, want: dict[str, Any]) -> None:
    why = _mismatch(st, p, name, data, want)
    if why is None:
        return
    where = st.display(st.join(p, name))
    if name == MANIFEST_NAME:
        raise CheckpointIncomplete(f"{where}: not the manifest recorded for this checkpoint "
                                   f"(the folder holds another checkpoint now, or is being replaced)")
    raise CheckpointCorrupt(f"{where}: checksum mismatch ({why})")


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
    if _mismatch(st, p, MANIFEST_NAME, manifest, want) is not None:
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

    The step loop's share of an asynchronous checkpoint is `stage` (copy the state into this
    writer's reused CPU buffers) and `submit`. `submit` returns the seconds it waited for the
    previous write. `on_written(result)` runs in the writer thread after the checkpoint is in
    place and retention ran. `wait()` returns once the last write (and any staging copy) is done.
    """

    def __init__(self, root: str | Path, *, asynchronous: bool = True, keep_last: int = 3,
                 on_written: Callable[[WriteResult], None] | None = None) -> None:
        self.root = str(root)
        self.asynchronous = asynchronous
        self.keep_last = keep_last
        self.on_written = on_written
        self._thread: threading.Thread | None = None  # a subclass's own write thread (dcp_store)
        self._worker: _WriteThread | None = None  # this writer's, started by the first async submit
        self._error: BaseException | None = None
        self.last: WriteResult | None = None
        self.results: list[WriteResult] = []
        self._staging: dict[str, StagingBuffers] = {}
        self._hooked: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self.staging_wait_s = 0.0  # total seconds optimizer steps waited for staging copies to finish

    def stage(self, name: str, state: Any, until: torch.optim.Optimizer | None = None) -> Any:
        """`state` (e.g. a model's or optimizer's state dict) with every tensor copied into a CPU
        buffer of this writer's, reused by the next `stage` of the same `name`: what goes into the
        Snapshot to `submit`. Waits for the previous write first (it may still read the buffers)
        and raises its error, as `submit` would.

        `until`: the optimizer whose `step` is the next change to its parameters and state. Their
        copy then runs in the writer thread once the snapshot is submitted, while the loop goes on
        (the next forward and backward), and that `step` (or a `wait`) waits for it — or makes it
        itself if the writer has not begun; nothing else may change them in place before.
        Without `until` every CPU tensor is copied before `stage` returns. CUDA tensors are copied
        without blocking either way, into pinned buffers, on the current stream."""
        self._join()  # the previous write; `copy` waits for the previous copy into these buffers
        buffers = self._staging.get(name)
        if buffers is None:
            buffers = self._staging[name] = StagingBuffers()
        if until is None:
            return buffers.copy(state)
        if until not in self._hooked:
            until.register_step_pre_hook(self._before_step)
            self._hooked.add(until)
        return buffers.copy(state, _updated_by(until))

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """The optimizer is about to update what a staging copy may still be reading. (CUDA copies
        need no wait here: they are queued on the stream before the step's kernels.)"""
        if any(b.deferred_pending for b in self._staging.values()):
            t0 = time.perf_counter()
            self._await_staging(raise_errors=False, device=False)  # a failed copy fails its write
            self.staging_wait_s += time.perf_counter() - t0

    def wait_staging(self) -> None:
        """Until the copies of the last `stage` calls are made (here, if the writer thread has not
        begun them): from then on the staged tensors may change. A failed copy fails its write."""
        self._await_staging(raise_errors=False)

    def _await_staging(self, *, raise_errors: bool, device: bool = True) -> None:
        for buffers in list(self._staging.values()):
            try:
                buffers.wait(device=device)
            except Exception:
                if raise_errors:
                    raise

    def _write(self, snap: Snapshot, protect: frozenset[int] = frozenset()) -> None:
        try:
            self._await_staging(raise_errors=True)
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
        self._join()
        stalled = time.perf_counter() - t0
        self._background(lambda: self._write(snap, protect))
        return stalled

    def copy_staged(self) -> None:
        """Make the deferred copies of the last `stage` calls in the writer thread, with no write
        after them, while the loop goes on (a rank keeping its own copy of a checkpoint another
        rank writes). A failed copy is raised by the next `stage`, `submit` or `wait`."""
        self._join()
        self._background(self._copy)

    def _copy(self) -> None:
        try:
            self._await_staging(raise_errors=True)
        except BaseException as e:  # noqa: BLE001 - surfaced to the step loop on the next call
            self._error = e

    def _background(self, job: Callable[[], None]) -> None:
        """Run `job` in the writer thread (after the previous one: call `_join` first), or here
        when this writer is synchronous."""
        if self.asynchronous:
            if self._worker is None or not self._worker.usable():
                self._worker = _WriteThread()
            self._worker.run(job)
        else:
            job()
            self._raise_pending()

    def _join(self) -> None:
        if self._worker is not None:
            self._worker.join()  # `_write` keeps its error for _raise_pending
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_pending()

    def wait(self) -> WriteResult | None:
        self._join()
        self._await_staging(raise_errors=False)  # staged, never submitted: its copy is done too
        return self.last


class _WriteThread:
    """A daemon thread that runs one job at a time and stays for the next: starting a thread per
    checkpoint costs the step loop milliseconds on a busy machine (`Thread.start` returns once
    the new thread has been scheduled). Daemon, as the thread per write was: an exiting process
    does not wait for a write (without its manifest it is incomplete, never half-valid). Stops
    once its owner drops it."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._pid = os.getpid()
        threading.Thread(target=_run_jobs, args=(self._jobs, self._idle), name="ckpt-write", daemon=True).start()
        weakref.finalize(self, self._jobs.put, None)

    def usable(self) -> bool:
        return self._pid == os.getpid()  # a forked child has no copy of the thread

    def run(self, job: Callable[[], None]) -> None:
        """Queue `job`; call `join` first (one job at a time)."""
        self._idle.clear()
        self._jobs.put(job)

    def join(self) -> None:
        if self.usable():
            self._idle.wait()


def _run_jobs(jobs: "queue.SimpleQueue[Callable[[], None] | None]", idle: threading.Event) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        try:
            job()
        finally:
            del job  # holds its writer: let it go while this thread waits for the next
            idle.set()
