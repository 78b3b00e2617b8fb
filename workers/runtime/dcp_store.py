"""Checkpoints through torch.distributed.checkpoint (DCP), with trainguard's trust rules.

Groundwork for "checkpoints on DCP"; not wired into the harness yet. Layout and trust are
those of docs/internals.md ("Checkpoint format", "Trust"): the folder is written as
`.tmp-<name>-<token>/` beside its final place and renamed into place, `manifest.json`
(schema 1, `"format": "dcp"`) is written last and lists the sha256 and size of every file
DCP wrote (`.metadata`, `__<rank>_<n>.distcp`), and the result carries a `CheckpointRef`
with every file's hash, the manifest's included: what rank 0 reports to the supervisor.

Why a reader of our own. `dcp.load` with torch's `FileSystemReader` trusts the files:
it unpickles `.metadata` with plain `pickle.load`, loads every non-tensor ("bytes") entry
with `torch.load(weights_only=False)`, and reopens shard files by path while it reads.
Anyone who can write checkpoint storage could therefore run code in every worker. No
library reader checks content against externally recorded hashes, so `VerifyingReader`
subclasses `FileSystemReader` and swaps its filesystem: every file it opens is read whole
into memory, compared with the hash recorded in the `CheckpointRef` (through
`checkpoint.read_verified`, so the verdicts are the same as for `.pt` checkpoints), and
served from those verified bytes; a file without a recorded hash is never opened.
`load_sharded` verifies the manifest and `.metadata` on every rank before DCP starts, and
the ranks agree on the verdict, so a refused checkpoint fails on all ranks at once.

Multi-rank assumptions.
- Shared filesystem: every rank writes its shards into the same folder and rank 0 hashes
  all of them once every rank has finished (a barrier on the group); rank 0 alone writes
  the manifest and renames. Local filesystem only (DCP's FileSystemWriter/Reader).
- `process_group`: the group DCP's collectives and ours run on. With `async_=True` the
  save's collectives run in a background thread while training continues; on the default
  group they interleave with the training's own collectives (on 2 gloo ranks this aborts
  with a collective mismatch), so pass a dedicated group: `dist.new_group(backend="gloo")`.
  One save at a time per group: a new save on a group first waits for the pending one.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
import uuid
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, overload

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from trainguard.workers.contract import MANIFEST_NAME, MANIFEST_SCHEMA_VERSION, CheckpointRef
from trainguard.workers.runtime.checkpoint import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointIncomplete,
    read_verified,
)

__all__ = ["FORMAT", "METADATA_NAME", "SaveResult", "PendingSave", "TrainState", "VerifyingReader",
           "save_sharded", "load_sharded"]

FORMAT = "dcp"
METADATA_NAME = ".metadata"
_RESERVED = ("schema_version", "format", "files", "created_at", "world_size")
_pending: dict[int, "PendingSave"] = {}  # id(group) -> the save still running on it
_pending_lock = threading.Lock()


@dataclass(frozen=True)
class SaveResult:
    path: str  # the published folder
    step: int | None  # the caller's "step" field, when given
    seconds: float  # from the call to the published folder
    bytes: int  # data files (manifest excluded)
    manifest: dict[str, Any]
    ref: CheckpointRef  # every file's hash, manifest included: what rank 0 reports


class PendingSave:
    """An async save: `result()` waits for DCP's write, the hashing, the manifest and the
    rename, and returns the `SaveResult` (on every rank) or raises the save's error.
    `stall_s` is the time the caller's thread spent in `save_sharded` (staging to CPU)."""

    def __init__(self, future: Future[SaveResult], stall_s: float) -> None:
        self._future = future
        self.stall_s = stall_s

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> SaveResult:
        return self._future.result(timeout)


class TrainState:
    """A model and its optimizer as one DCP `Stateful` (torch.distributed.checkpoint.state_dict
    `get_state_dict`/`set_state_dict`: parameter names instead of optimizer ids, optimizer
    state initialised before a load so its tensors can be loaded into in place)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optimizer"])


# -- save ------------------------------------------------------------------------------------------
def _dist_on(group: Any) -> bool:
    """Whether a process group is up (`group` None: the default one; DCP's no_dist otherwise)."""
    return bool(dist.is_available() and dist.is_initialized())


def _rank(group: Any) -> int:
    return dist.get_rank(group) if _dist_on(group) else 0


def _world(group: Any) -> int:
    return dist.get_world_size(group) if _dist_on(group) else 1


def _broadcast(value: Any, group: Any) -> Any:
    """rank 0's `value` on every rank of `group` (itself without a process group)."""
    if not _dist_on(group):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]


def _file_digest(path: Path) -> dict[str, Any]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return {"sha256": h.hexdigest(), "bytes": n}


@overload
def save_sharded(state: dict[str, Any], path: str | os.PathLike[str], *, process_group: Any = ...,
                 async_: Literal[False] = ..., fields: Mapping[str, Any] | None = ...) -> SaveResult: ...
@overload
def save_sharded(state: dict[str, Any], path: str | os.PathLike[str], *, process_group: Any = ...,
                 async_: Literal[True], fields: Mapping[str, Any] | None = ...) -> PendingSave: ...


def save_sharded(state: dict[str, Any], path: str | os.PathLike[str], *, process_group: Any = None,
                 async_: bool = False, fields: Mapping[str, Any] | None = None) -> SaveResult | PendingSave:
    """Save `state` (e.g. `{"train": TrainState(model, opt), "extra": {...}}`) with DCP into the
    folder `path`, then hash every file, write `manifest.json` last (with `fields`: step,
    healthy, batch_cursor, metrics, ...) and rename the folder into place. Every rank of
    `process_group` calls it with the same `path`; every rank gets the same `SaveResult`.
    An existing checkpoint at `path` is replaced (moved aside, then deleted).

    `async_=True`: returns a `PendingSave` once the state is staged to CPU memory; DCP's
    write and the publishing happen in background threads. Use a dedicated group then
    (module docstring)."""
    t0 = time.perf_counter()
    key = id(process_group)
    with _pending_lock:
        previous = _pending.pop(key, None)
    if previous is not None:
        try:
            previous.result()
        except BaseException:  # noqa: BLE001 - reported to whoever waits on that save
            pass
    final = Path(path).absolute()
    extra = {k: v for k, v in (fields or {}).items() if k not in _RESERVED}
    token = _broadcast(uuid.uuid4().hex[:8], process_group)
    tmp = final.parent / f".tmp-{final.name}-{token}"
    tmp.mkdir(parents=True, exist_ok=True)
    writer = FileSystemWriter(str(tmp))  # sync_files=True: data durable before the manifest
    no_dist = not _dist_on(process_group)
    if not async_:
        try:
            dcp.save(state, storage_writer=writer, process_group=process_group, no_dist=no_dist)
        except BaseException:
            _cleanup(tmp, process_group)
            raise
        return _publish(tmp, final, extra, process_group, t0)

    try:
        upload = dcp.async_save(state, storage_writer=writer, process_group=process_group, no_dist=no_dist)
    except BaseException:
        _cleanup(tmp, process_group)
        raise
    upload_future: Future[Any] = upload.upload_completion if hasattr(upload, "upload_completion") else upload
    out: Future[SaveResult] = Future()

    def finish() -> None:
        try:
            upload_future.result()
        except BaseException as e:  # noqa: BLE001 - DCP's failure is collective: every rank lands here
            _cleanup(tmp, process_group)
            out.set_exception(e)
            return
        try:
            out.set_result(_publish(tmp, final, extra, process_group, t0))
        except BaseException as e:  # noqa: BLE001 - handed to the waiter
            out.set_exception(e)

    threading.Thread(target=finish, name=f"dcp-publish-{final.name}", daemon=True).start()
    pending = PendingSave(out, time.perf_counter() - t0)
    with _pending_lock:
        _pending[key] = pending
    return pending


def _cleanup(tmp: Path, group: Any) -> None:
    if _rank(group) == 0:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, final: Path, extra: dict[str, Any], group: Any, t0: float) -> SaveResult:
    """After every rank's DCP write: rank 0 hashes all files, writes the manifest, renames;
    its result (or error) goes to every rank."""
    if _dist_on(group):
        dist.barrier(group=group)
    outcome: SaveResult | str | None = None
    if _rank(group) == 0:
        try:
            outcome = _publish_rank0(tmp, final, extra, _world(group), t0)
        except Exception as e:  # noqa: BLE001 - sent to every rank, raised there
            outcome = f"{type(e).__name__}: {e}"
            _cleanup(tmp, group)
    outcome = _broadcast(outcome, group)
    if not isinstance(outcome, SaveResult):
        raise CheckpointError(f"{final}: publishing the DCP checkpoint failed on rank 0: {outcome}")
    return outcome


def _publish_rank0(tmp: Path, final: Path, extra: dict[str, Any], world: int, t0: float) -> SaveResult:
    files = {p.name: _file_digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    if METADATA_NAME not in files or MANIFEST_NAME in files:
        raise CheckpointError(f"{tmp}: unexpected DCP output {sorted(files)}")
    manifest = {**extra, "schema_version": MANIFEST_SCHEMA_VERSION, "format": FORMAT, "world_size": world,
                "created_at": time.time(), "files": files}
    raw = json.dumps(manifest, indent=1, sort_keys=True, default=str).encode()
    with open(tmp / MANIFEST_NAME, "wb") as f:  # last: the completeness marker
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # a same-step checkpoint of an abandoned timeline: aside, in, delete
        import shutil

        trash = final.parent / f".trash-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    digest = {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
    ref = CheckpointRef(str(final), {**files, MANIFEST_NAME: digest})
    step = extra.get("step")
    return SaveResult(str(final), int(step) if step is not None else None, time.perf_counter() - t0,
                      sum(int(f["bytes"]) for f in files.values()), manifest, ref)


# -- load ------------------------------------------------------------------------------------------
class _VerifiedFileSystem(FileSystem):  # type: ignore[misc]
    """DCP's local FileSystem, read side only: a file is served from bytes that matched `ref`."""

    def __init__(self, ref: CheckpointRef, verified: dict[str, bytes]) -> None:
        super().__init__()
        self.ref = ref
        self.root = Path(ref.path).absolute()
        self.verified = verified  # name -> bytes already checked (manifest, .metadata)

    def bytes_of(self, path: str | os.PathLike[str]) -> bytes:
        p = Path(path).absolute()
        if p.parent != self.root:
            raise CheckpointCorrupt(f"{p}: outside the checkpoint {self.root}; refused")
        name = p.name
        if name not in self.ref.files or name == MANIFEST_NAME:
            raise CheckpointCorrupt(f"{p}: no recorded hash for this file; refused (nothing deserialized)")
        if name in self.verified:
            return self.verified[name]
        return read_verified(self.ref, [name])[name]  # read once, hashed, then served

    def verify(self, path: str | os.PathLike[str]) -> None:
        """Read, check and keep the bytes of `path` for the reads to come."""
        name = Path(path).name
        if name not in self.verified:
            self.verified[name] = self.bytes_of(path)

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[io.IOBase]:
        if "r" not in mode or any(c in mode for c in "wa+"):
            raise CheckpointError(f"{path}: the verifying reader only reads (mode {mode!r})")
        yield io.BytesIO(self.bytes_of(path))


class VerifyingReader(FileSystemReader):  # type: ignore[misc]
    """`FileSystemReader` whose every read is served from bytes checked against `ref`
    (module docstring). `preverified` holds bytes the caller already checked."""

    def __init__(self, ref: CheckpointRef, preverified: dict[str, bytes] | None = None) -> None:
        super().__init__(ref.path)
        self.fs = _VerifiedFileSystem(ref, dict(preverified or {}))

    def prepare_local_plan(self, plan: Any) -> Any:
        """Before any shard byte is deserialized, verify every file this rank's plan reads
        (held in memory until `read_data` is done): a refused file leaves the state untouched,
        and under a process group DCP's planning collective turns one rank's refusal into
        every rank's, before any rank reads."""
        for rel in sorted({self.storage_data[item.storage_index].relative_path for item in plan.items}):
            self.fs.verify(self.fs.concat_path(self.path, rel))
        return super().prepare_local_plan(plan)

    def read_data(self, plan: Any, planner: Any) -> Any:
        try:
            return super().read_data(plan, planner)
        finally:  # drop the verified shard bytes, keep .metadata
            self.fs.verified = {k: v for k, v in self.fs.verified.items() if k == METADATA_NAME}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("rank") is not None:  # rank-local metadata: never recorded by save_sharded
            raise CheckpointCorrupt(f"{self.path}: no global {METADATA_NAME}; rank-local metadata refused")
        return super().read_metadata()


def _agree(error: BaseException | None, group: Any) -> None:
    """Raise on every rank if any rank failed (its own error first, else the lowest rank's)."""
    if _dist_on(group):
        errors: list[Any] = [None] * _world(group)
        dist.all_gather_object(errors, error, group=group)
        error = error or next((e for e in errors if e is not None), None)
    if error is not None:
        raise error


def _unwrap(e: BaseException, rank: int) -> BaseException:
    """DCP's CheckpointException (every rank's failures) -> our CheckpointError, own rank's first."""
    failures: dict[int, Any] = getattr(e, "failures", {})
    for r in [rank] + sorted(r for r in failures if r != rank):
        found = failures[r][0] if r in failures else None
        if isinstance(found, CheckpointError):
            return found
    return e


def load_sharded(ref: CheckpointRef, state: dict[str, Any], *, process_group: Any = None) -> dict[str, Any]:
    """Load the checkpoint `ref` into `state` in place (DCP's `load`: tensors copied into the
    given ones, `Stateful` values such as `TrainState` get `load_state_dict`, other values
    replaced), resharding as DCP does (saved at world size 2, loaded at 1). Every byte read
    is checked against `ref` first; `CheckpointIncomplete` when the recorded manifest is not
    there, `CheckpointCorrupt` when a file is missing, changed or unrecorded — the file named,
    nothing deserialized. Every rank of `process_group` calls it. Returns the manifest."""
    if MANIFEST_NAME not in ref.files:
        raise CheckpointError(f"{ref.path}: no recorded hash for {MANIFEST_NAME}")
    error: BaseException | None = None
    blobs: dict[str, bytes] = {}
    manifest: dict[str, Any] = {}
    try:
        if METADATA_NAME not in ref.files:
            raise CheckpointCorrupt(f"{ref.path}/{METADATA_NAME}: no recorded hash; not a DCP checkpoint")
        blobs = read_verified(ref, [METADATA_NAME])  # the manifest first, then .metadata
        manifest = json.loads(blobs[MANIFEST_NAME])
        if manifest.get("format") != FORMAT:
            raise CheckpointCorrupt(f"{ref.path}/{MANIFEST_NAME}: format {manifest.get('format')!r}, not {FORMAT!r}")
    except CheckpointError as e:
        error = e
    _agree(error, process_group)
    reader = VerifyingReader(ref, {METADATA_NAME: blobs[METADATA_NAME]})
    try:
        dcp.load(state, storage_reader=reader, process_group=process_group, no_dist=not _dist_on(process_group))
    except CheckpointException as e:
        raise _unwrap(e, _rank(process_group)) from None
    manifest["path"] = ref.path
    return dict(manifest)
