"""Checkpoints through torch.distributed.checkpoint (DCP), with trainguard's trust rules.

The harness writes these for `checkpoint.format: dcp` (the default under FSDP2) through
`ShardedCheckpointWriter` and loads them through `load_sharded_files`; a later stage's
initial weights and `trainguard export` read the model alone (`load_model_state_dict`,
routed by `workers.model.load_model_state`). Layout and trust are
those of docs/internals.md ("Checkpoint format", "Trust"): the folder is written as
`.tmp-<name>-<token>/` beside its final place and renamed into place, `manifest.json`
(schema 1, `"format": "dcp"`) is written last and lists the digest (BLAKE3; `checkpoint.DIGEST`)
and size of every file DCP wrote (`.metadata`, `__<rank>_<n>.distcp`), and the result carries a `CheckpointRef`
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

import io
import json
import os
import threading
import time
import uuid
import warnings
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, overload

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict

from trainguard.workers.contract import MANIFEST_NAME, MANIFEST_SCHEMA_VERSION, CheckpointRef
from trainguard.workers.runtime.checkpoint import (
    CheckpointCorrupt,
    CheckpointWriter,
    CheckpointError,
    CheckpointIncomplete,
    Snapshot,
    WriteResult,
    apply_retention,
    checkpoint_path,
    digest_record,
    file_digest,
    manifest_fields,
    new_hasher,
    read_verified,
    side_payloads,
    stage_root,
    storage_for,
)

__all__ = ["FORMAT", "METADATA_NAME", "SaveResult", "PendingSave", "TrainState", "VerifyingReader",
           "save_sharded", "load_sharded", "load_sharded_files", "load_model_state_dict",
           "ShardedCheckpointWriter"]

FORMAT = "dcp"
# DCP warns on every single-process save/load (no_dist), which is what world size 1 is
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                        category=UserWarning)
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
    state initialised before a load so its tensors can be loaded into in place).

    Two cases `get_state_dict` alone gets wrong for an exact resume:
    - Saved before the first optimizer step: `get_state_dict` would create the state by a
      zero-gradient step (AdamW's `step` becomes 1), which the uninterrupted run never takes.
      The model and the param groups are saved, with no optimizer state.
    - A parameter that never got a gradient (an HF reward model's unused `lm_head`) has no
      optimizer state. The load template has state for every parameter; `load_sharded` lets
      only optimizer-state keys be absent from the checkpoint and names them in `absent`,
      and `load_state_dict` drops the state those parameters were given by the template."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loading = False  # set by load_sharded while DCP builds its load template
        self.absent: set[str] = set()  # parameters (FQNs) whose optimizer state the checkpoint lacks

    def state_dict(self) -> dict[str, Any]:
        if not self.loading and not self.optimizer.state:
            names = {id(p): n for n, p in self.model.named_parameters()}
            groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
                      for g in self.optimizer.param_groups]
            return {"model": get_model_state_dict(self.model), "optimizer": {"state": {}, "param_groups": groups}}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optimizer"])
        if self.absent:
            params = dict(self.model.named_parameters())
            for name in self.absent:
                self.optimizer.state.pop(params[name], None)


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
    """The recorded entry of a file DCP wrote ({"blake3": hex, "bytes": n}), read back in chunks."""
    h, n = new_hasher(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return digest_record(h, n)


@overload
def save_sharded(state: dict[str, Any], path: str | os.PathLike[str], *, process_group: Any = ...,
                 async_: Literal[False] = ..., fields: Mapping[str, Any] | None = ...,
                 files: Mapping[str, bytes] | None = ...) -> SaveResult: ...
@overload
def save_sharded(state: dict[str, Any], path: str | os.PathLike[str], *, process_group: Any = ...,
                 async_: Literal[True], fields: Mapping[str, Any] | None = ...,
                 files: Mapping[str, bytes] | None = ...) -> PendingSave: ...


def save_sharded(state: dict[str, Any], path: str | os.PathLike[str], *, process_group: Any = None,
                 async_: bool = False, fields: Mapping[str, Any] | None = None,
                 files: Mapping[str, bytes] | None = None) -> SaveResult | PendingSave:
    """Save `state` (e.g. `{"train": TrainState(model, opt), "extra": {...}}`) with DCP into the
    folder `path`, then hash every file, write `manifest.json` last (with `fields`: step,
    healthy, batch_cursor, metrics, ...) and rename the folder into place. `files`: more
    files (name -> bytes) rank 0 writes into the folder beside DCP's, hashed with them (the
    harness's per-rank RNG states, stage extras and cursor); other ranks' `fields` and
    `files` are ignored. Every rank of
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
    side = dict(files or {})
    bad = [n for n in side if n in (METADATA_NAME, MANIFEST_NAME) or n.endswith(".distcp") or "/" in n or n.startswith(".")]
    if bad:
        raise ValueError(f"save_sharded(files=...): {bad[0]!r} is reserved for DCP's or the manifest's files")
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
        return _publish(tmp, final, extra, side, process_group, t0)

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
            out.set_result(_publish(tmp, final, extra, side, process_group, t0))
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


def _publish(tmp: Path, final: Path, extra: dict[str, Any], side: dict[str, bytes], group: Any,
             t0: float) -> SaveResult:
    """After every rank's DCP write: rank 0 hashes all files, writes the manifest, renames;
    its result (or error) goes to every rank."""
    if _dist_on(group):
        dist.barrier(group=group)
    outcome: SaveResult | str | None = None
    if _rank(group) == 0:
        try:
            outcome = _publish_rank0(tmp, final, extra, side, _world(group), t0)
        except Exception as e:  # noqa: BLE001 - sent to every rank, raised there
            outcome = f"{type(e).__name__}: {e}"
            _cleanup(tmp, group)
    outcome = _broadcast(outcome, group)
    if not isinstance(outcome, SaveResult):
        raise CheckpointError(f"{final}: publishing the DCP checkpoint failed on rank 0: {outcome}")
    return outcome


def _publish_rank0(tmp: Path, final: Path, extra: dict[str, Any], side: dict[str, bytes], world: int,
                   t0: float) -> SaveResult:
    for name, data in side.items():
        with open(tmp / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
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
    ref = CheckpointRef(str(final), {**files, MANIFEST_NAME: file_digest(raw)})
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


class _Planner(DefaultLoadPlanner):  # type: ignore[misc]
    """DCP's load planner, strict except for optimizer state (TrainState's docstring): a key of
    the load template missing from the checkpoint is refused, naming it, unless it is a
    TrainState's optimizer state, whose parameter is then marked absent."""

    def __init__(self, path: str, trained: dict[str, TrainState]) -> None:
        super().__init__(allow_partial_load=True)
        self.path = path
        self.trained = trained

    def create_local_plan(self) -> Any:
        saved = self.metadata.state_dict_metadata
        for key in self.state_dict:
            if key in saved:
                continue
            owner = next((k for k in self.trained if key.startswith(f"{k}.optimizer.state.")), None)
            if owner is None:
                raise CheckpointCorrupt(f"{self.path}: {key} is not in the checkpoint (another model, "
                                        f"or saved by another version); nothing loaded")
            self.trained[owner].absent.add(key[len(f"{owner}.optimizer.state."):].rsplit(".", 1)[0])
        return super().create_local_plan()


def load_sharded(ref: CheckpointRef, state: dict[str, Any], *, process_group: Any = None) -> dict[str, Any]:
    """Load the checkpoint `ref` into `state` in place (DCP's `load`: tensors copied into the
    given ones, `Stateful` values such as `TrainState` get `load_state_dict`, other values
    replaced), resharding as DCP does (saved at world size 2, loaded at 1). Every byte read
    is checked against `ref` first; `CheckpointIncomplete` when the recorded manifest is not
    there, `CheckpointCorrupt` when a file is missing, changed or unrecorded — the file named,
    nothing deserialized. Every rank of `process_group` calls it. Returns the manifest."""
    return load_sharded_files(ref, state, (), process_group=process_group)[0]


def load_sharded_files(ref: CheckpointRef, state: dict[str, Any], names: Iterable[str], *,
                       process_group: Any = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """`load_sharded`, and the verified bytes of the checkpoint's other files `names` (written
    beside DCP's through `save_sharded(files=...)`), read before DCP starts: a refusal of any
    of them on any rank fails every rank before anything is loaded."""
    if MANIFEST_NAME not in ref.files:
        raise CheckpointError(f"{ref.path}: no recorded hash for {MANIFEST_NAME}")
    error: BaseException | None = None
    blobs: dict[str, bytes] = {}
    manifest: dict[str, Any] = {}
    try:
        if METADATA_NAME not in ref.files:
            raise CheckpointCorrupt(f"{ref.path}/{METADATA_NAME}: no recorded hash; not a DCP checkpoint")
        blobs = read_verified(ref, [METADATA_NAME, *names])  # the manifest first, then .metadata
        manifest = json.loads(blobs[MANIFEST_NAME])
        if manifest.get("format") != FORMAT:
            raise CheckpointCorrupt(f"{ref.path}/{MANIFEST_NAME}: format {manifest.get('format')!r}, not {FORMAT!r}")
    except CheckpointError as e:
        error = e
    _agree(error, process_group)
    reader = VerifyingReader(ref, {METADATA_NAME: blobs[METADATA_NAME]})
    trained = {k: v for k, v in state.items() if isinstance(v, TrainState)}
    for ts in trained.values():
        ts.loading, ts.absent = True, set()
    try:
        dcp.load(state, storage_reader=reader, planner=_Planner(ref.path, trained), process_group=process_group,
                 no_dist=not _dist_on(process_group))
    except CheckpointException as e:
        raise _unwrap(e, _rank(process_group)) from None
    finally:
        for ts in trained.values():
            ts.loading = False
    manifest["path"] = ref.path
    return dict(manifest), {n: blobs[n] for n in names}


def load_model_state_dict(ref: CheckpointRef, key: str = "train") -> dict[str, torch.Tensor]:
    """The full model state dict of a `TrainState` saved under `key`, on the CPU, in this process
    alone (no process group): for a later stage's initial weights and for export. Every byte is
    verified against `ref` before it is deserialized, as in `load_sharded`."""
    blobs = read_verified(ref, [METADATA_NAME])
    reader = VerifyingReader(ref, {METADATA_NAME: blobs[METADATA_NAME]})
    prefix = f"{key}.model."
    template: dict[str, Any] = {}
    for fqn, meta in reader.read_metadata().state_dict_metadata.items():
        if fqn.startswith(prefix) and hasattr(meta, "size"):
            template[fqn[len(prefix):]] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not template:
        raise CheckpointCorrupt(f"{ref.path}/{METADATA_NAME}: no model tensors under {prefix!r}")
    try:
        dcp.load({key: {"model": template}}, storage_reader=reader, no_dist=True)
    except CheckpointException as e:
        raise _unwrap(e, 0) from None
    return template


# -- the harness's writer --------------------------------------------------------------------------
class ShardedCheckpointWriter(CheckpointWriter):
    """`checkpoint.CheckpointWriter`'s counterpart for DCP checkpoints (the stage option
    `checkpoint.format`): every rank calls `submit` at the same step with its own `state`
    (collective), each rank writes its shards, rank 0 writes the snapshot's other files
    (`side_payloads`: RNG of every rank, extras, cursor) and the manifest, then runs retention
    and `on_written`. Asynchronous: `submit` returns once the state is staged to CPU memory
    (DCP's `async_save` on `process_group`, a group of its own — see the module docstring);
    a failed save is raised by the next `submit` or `wait`. Local filesystem only."""

    def __init__(self, root: str | Path, *, rank: int, process_group: Any = None, asynchronous: bool = True,
                 keep_last: int = 3, on_written: Any = None) -> None:
        st, _ = storage_for(root)
        if not st.local:
            raise ValueError(f"checkpoint.storage {root!r}: DCP checkpoints (checkpoint.format dcp, the default "
                             "for parallel.strategy fsdp) are written to a local or shared filesystem only")
        super().__init__(root, asynchronous=asynchronous, keep_last=keep_last, on_written=on_written)
        self.rank = rank
        self.group = process_group

    def submit(self, snap: Snapshot, protect: frozenset[int] = frozenset(),  # type: ignore[override]
               state: dict[str, Any] | None = None) -> float:
        """Save `state` (e.g. {"train": TrainState(model, optimizer)}) with `snap`'s description;
        only rank 0's `snap` fields are used. Returns the seconds spent waiting for the previous save."""
        t0 = time.perf_counter()
        self.wait()
        stalled = time.perf_counter() - t0
        if state is None:
            raise ValueError("ShardedCheckpointWriter.submit needs the state to save (e.g. a TrainState)")
        path = checkpoint_path(self.root, snap.run, snap.stage, snap.step)
        fields = manifest_fields(snap) if self.rank == 0 else None
        files = side_payloads(snap) if self.rank == 0 else None
        if not self.asynchronous:
            self._finish(save_sharded(state, path, process_group=self.group, fields=fields, files=files), snap, protect)
            return stalled
        pending = save_sharded(state, path, process_group=self.group, async_=True, fields=fields, files=files)
        self._thread = threading.Thread(target=self._complete, args=(pending, snap, protect),
                                        name=f"dcp-ckpt-{snap.step}", daemon=True)
        self._thread.start()
        return stalled

    def _complete(self, pending: PendingSave, snap: Snapshot, protect: frozenset[int]) -> None:
        try:
            self._finish(pending.result(), snap, protect)
        except BaseException as e:  # noqa: BLE001 - surfaced to the step loop on the next call
            self._error = e

    def _finish(self, res: SaveResult, snap: Snapshot, protect: frozenset[int]) -> None:
        out = WriteResult(res.path, snap.step, res.seconds, res.bytes, tuple(snap.tags), res.manifest, res.ref)
        if self.rank == 0:
            apply_retention(stage_root(self.root, snap.run, snap.stage), self.keep_last, protect)
        self.last = out
        self.results.append(out)
        if self.rank == 0 and self.on_written is not None:
            self.on_written(out)
