"""DCP checkpoints (workers/runtime/dcp_store.py), single process: round trip, manifest and
atomic publish, async save, and refusal of anything that does not match the recorded hashes
before a byte of it is deserialized."""
from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from trainguard.workers.contract import MANIFEST_NAME, CheckpointRef
from trainguard.workers.runtime.checkpoint import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointIncomplete,
    list_checkpoints,
    verify_checkpoint,
)
from trainguard.workers.runtime.dcp_store import (
    METADATA_NAME,
    PendingSave,
    SaveResult,
    TrainState,
    load_sharded,
    save_sharded,
)

from tests.support import flat_state

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DCP's "assuming single process" notice


def _trained(seed: int = 0, steps: int = 3) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, opt, steps)
    return model, opt


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        model(torch.randn(5, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _save(tmp_path: Path, model, opt, step: int = 3, **kw) -> SaveResult:
    state = {"train": TrainState(model, opt), "extra": {"cursor": step, "note": "x"}}
    return save_sharded(state, tmp_path / "run" / "pretrain" / f"step-{step:08d}",
                        fields={"step": step, "batch_cursor": step, "healthy": True, "files": "ignored"}, **kw)


def test_round_trip_is_bitwise_and_manifest_lists_every_file(tmp_path):
    model, opt = _trained()
    saved = flat_state(model, opt)
    res = _save(tmp_path, model, opt)
    folder = Path(res.path)
    on_disk = sorted(p.name for p in folder.iterdir())
    assert METADATA_NAME in on_disk and any(n.endswith(".distcp") for n in on_disk) and MANIFEST_NAME in on_disk
    assert sorted(res.ref.files) == on_disk and res.ref.path == str(folder)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]  # published by rename
    manifest = json.loads((folder / MANIFEST_NAME).read_bytes())
    assert manifest["format"] == "dcp" and manifest["step"] == 3 and manifest["healthy"] is True
    assert set(manifest["files"]) == set(on_disk) - {MANIFEST_NAME}  # "files" is not the caller's
    assert res.step == 3 and res.bytes == sum(f["bytes"] for f in manifest["files"].values())
    import blake3  # every file, the manifest included, recorded with its BLAKE3 digest

    assert all(res.ref.files[n] == {"blake3": blake3.blake3((folder / n).read_bytes()).hexdigest(),
                                    "bytes": (folder / n).stat().st_size} for n in on_disk)
    # the generic verifier and listing accept the format (same schema, same reference shape)
    assert verify_checkpoint(res.ref)["step"] == 3 and [m["step"] for m in list_checkpoints(folder.parent)] == [3]

    _step(model, opt, 4)  # move away from the checkpoint
    fresh_model, fresh_opt = _trained(seed=1, steps=0)  # other weights, optimizer without state
    state = {"train": TrainState(fresh_model, fresh_opt), "extra": {"cursor": 0, "note": ""}}
    m = load_sharded(res.ref, state)
    assert m["step"] == 3 and state["extra"] == {"cursor": 3, "note": "x"}
    _assert_bitwise(saved, flat_state(fresh_model, fresh_opt))
    # and it trains on identically from there
    model2, opt2 = _trained(seed=2, steps=1)
    load_sharded(res.ref, {"train": TrainState(model2, opt2), "extra": {}})
    torch.manual_seed(7)
    _step(fresh_model, fresh_opt, 2)
    torch.manual_seed(7)
    _step(model2, opt2, 2)
    _assert_bitwise(flat_state(fresh_model, fresh_opt), flat_state(model2, opt2))


def test_same_step_is_replaced_atomically(tmp_path):
    model, opt = _trained()
    first = _save(tmp_path, model, opt)
    _step(model, opt, 1)
    second = _save(tmp_path, model, opt)
    assert first.path == second.path and first.ref != second.ref
    assert [p.name for p in Path(first.path).parent.iterdir()] == [Path(first.path).name]
    with pytest.raises(CheckpointIncomplete, match=MANIFEST_NAME):  # the old reference is gone, not corrupt
        load_sharded(first.ref, {"train": TrainState(*_trained(steps=0)), "extra": {}})


def test_async_save_publishes_after_the_write_while_training_continues(tmp_path):
    model, opt = _trained()
    saved = flat_state(model, opt)
    pending = _save(tmp_path, model, opt, async_=True)
    assert isinstance(pending, PendingSave) and pending.stall_s >= 0
    _step(model, opt, 3)  # training goes on; the checkpoint holds the staged state
    res = pending.result(timeout=60)
    assert MANIFEST_NAME in res.ref.files and verify_checkpoint(res.ref)["step"] == 3
    m2, o2 = _trained(seed=5, steps=0)
    load_sharded(res.ref, {"train": TrainState(m2, o2), "extra": {}})
    _assert_bitwise(saved, flat_state(m2, o2))
    # a second async save on the same (absent) group waits for nothing pending and works too
    res2 = _save(tmp_path, model, opt, step=6, async_=True).result(timeout=60)
    assert res2.step == 6


class _Evil:
    """Unpickling this creates `marker`: proof that something was deserialized."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _target() -> tuple[dict, dict[str, torch.Tensor], torch.nn.Module, torch.optim.Optimizer]:
    m, o = _trained(seed=9, steps=1)
    return {"train": TrainState(m, o), "extra": {"cursor": -1}}, flat_state(m, o), m, o


def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["shard", "metadata", "manifest"])
def test_a_flipped_byte_is_refused_naming_the_file(tmp_path, kind):
    res = _save(tmp_path, *_trained())
    folder = Path(res.path)
    name = {"shard": next(n for n in res.ref.files if n.endswith(".distcp")), "metadata": METADATA_NAME,
            "manifest": MANIFEST_NAME}[kind]
    _flip(folder / name)
    state, before, m, o = _target()
    exc = CheckpointIncomplete if kind == "manifest" else CheckpointCorrupt  # docs/internals.md verdicts
    with pytest.raises(exc, match=name.replace(".", r"\.")):
        load_sharded(res.ref, state)
    _assert_bitwise(before, flat_state(m, o))  # nothing loaded
    assert state["extra"] == {"cursor": -1}


def test_pickle_payload_in_metadata_is_never_unpickled(tmp_path):
    res = _save(tmp_path, *_trained())
    honest = CheckpointRef(res.ref.path, {k: dict(v) for k, v in res.ref.files.items()})  # recorded, untouched
    marker = tmp_path / "PWNED"
    evil = pickle.dumps(_Evil(marker))
    control = tmp_path / "control"
    shutil.copytree(res.path, control)
    (Path(res.path) / METADATA_NAME).write_bytes(evil)
    state, before, m, o = _target()
    with pytest.raises(CheckpointCorrupt, match=r"\.metadata"):
        load_sharded(honest, state)
    assert not marker.exists()
    _assert_bitwise(before, flat_state(m, o))
    # control: torch's own reader does run it (which is why the verifying reader exists)
    import torch.distributed.checkpoint as dcp

    (control / METADATA_NAME).write_bytes(evil)
    with warnings.catch_warnings(), pytest.raises(BaseException):
        warnings.simplefilter("ignore")
        dcp.load({"extra": {}}, storage_reader=dcp.FileSystemReader(str(control)), no_dist=True)
    assert marker.exists()


def test_pickle_payload_in_a_shard_is_never_loaded(tmp_path):
    res = _save(tmp_path, *_trained())
    shard = next(Path(res.path) / n for n in res.ref.files if n.endswith(".distcp"))
    marker = tmp_path / "PWNED"
    shard.write_bytes(shard.read_bytes() + pickle.dumps(_Evil(marker)))
    state, before, m, o = _target()
    with pytest.raises(CheckpointCorrupt, match=shard.name):
        load_sharded(res.ref, state)
    assert not marker.exists()
    _assert_bitwise(before, flat_state(m, o))


def test_missing_or_foreign_manifest_is_incomplete(tmp_path):
    res = _save(tmp_path, *_trained())
    other = _save(tmp_path / "other", *_trained(seed=3))
    manifest = Path(res.path) / MANIFEST_NAME
    shutil.copy(Path(other.path) / MANIFEST_NAME, manifest)  # a valid manifest, not the recorded one
    with pytest.raises(CheckpointIncomplete, match=MANIFEST_NAME):
        load_sharded(res.ref, _target()[0])
    manifest.unlink()
    with pytest.raises(CheckpointIncomplete, match=MANIFEST_NAME):
        load_sharded(res.ref, _target()[0])


def test_unrecorded_or_missing_files_are_refused(tmp_path):
    res = _save(tmp_path, *_trained())
    shard = next(n for n in res.ref.files if n.endswith(".distcp"))
    unrecorded = CheckpointRef(res.ref.path, {k: v for k, v in res.ref.files.items() if k != shard})
    state, before, m, o = _target()
    with pytest.raises(CheckpointCorrupt, match=f"{shard}: no recorded hash"):
        load_sharded(unrecorded, state)
    _assert_bitwise(before, flat_state(m, o))
    no_meta = CheckpointRef(res.ref.path, {k: v for k, v in res.ref.files.items() if k != METADATA_NAME})
    with pytest.raises(CheckpointCorrupt, match=r"\.metadata"):
        load_sharded(no_meta, state)
    with pytest.raises(CheckpointError, match=MANIFEST_NAME):
        load_sharded(CheckpointRef(res.ref.path, {shard: res.ref.files[shard]}), state)
    (Path(res.path) / shard).unlink()
    with pytest.raises(CheckpointCorrupt, match=shard):
        load_sharded(res.ref, state)


def test_a_refused_file_leaves_every_target_untouched_even_after_good_files(tmp_path):
    """Every file a rank reads is verified before the first one is deserialized: with one file
    per tensor and the last one flipped, no tensor is loaded (torch's reader would have loaded
    the first two before reaching the third). Recorded with sha256, as checkpoints written before
    BLAKE3 were: those still load, and a flip is still caught."""
    import hashlib

    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "multi"
    sd = {"a": torch.ones(4), "b": torch.full((4,), 2.0), "c": torch.full((4,), 3.0)}
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(folder), single_file_per_rank=False), no_dist=True)
    files = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
             for p in folder.iterdir()}
    assert len([n for n in files if n.endswith(".distcp")]) == 3
    raw = json.dumps({"schema_version": 1, "format": "dcp", "files": files}).encode()
    (folder / MANIFEST_NAME).write_bytes(raw)
    ref = CheckpointRef(str(folder), {**files, MANIFEST_NAME: {"sha256": hashlib.sha256(raw).hexdigest(),
                                                                "bytes": len(raw)}})
    target = {k: torch.zeros(4) for k in sd}
    load_sharded(ref, target)
    assert all(torch.equal(target[k], sd[k]) for k in sd)
    last = sorted(n for n in files if n.endswith(".distcp"))[-1]
    _flip(folder / last)
    target = {k: torch.zeros(4) for k in sd}
    with pytest.raises(CheckpointCorrupt, match=last):
        load_sharded(ref, target)
    assert all(torch.equal(v, torch.zeros(4)) for v in target.values())


# -- what the harness needs: exact optimizer state, side files, the model alone, its writer ---------
class _WithUnused(torch.nn.Module):
    """A parameter that never gets a gradient (as an HF reward model's lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        self.used = torch.nn.Linear(4, 4)
        self.unused = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_saving_before_the_first_step_leaves_the_optimizer_untouched_and_loads_exactly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    res = save_sharded({"train": TrainState(model, opt)}, tmp_path / "step-0")
    assert opt.state_dict()["state"] == {}  # get_state_dict would have taken a zero-gradient step
    torch.manual_seed(1)
    model2 = torch.nn.Linear(4, 4)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    load_sharded(res.ref, {"train": TrainState(model2, opt2)})
    assert opt2.state_dict()["state"] == {}
    _assert_bitwise(flat_state(model, opt), flat_state(model2, opt2))
    x = torch.randn(3, 4)
    for m, o in ((model, opt), (model2, opt2)):  # the first step of each: the same AdamW step
        m(x).sum().backward()
        o.step()
    _assert_bitwise(flat_state(model, opt), flat_state(model2, opt2))


def test_a_parameter_without_optimizer_state_gets_none_after_a_load(tmp_path):
    torch.manual_seed(0)
    model = _WithUnused()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    res = save_sharded({"train": TrainState(model, opt)}, tmp_path / "step-1")
    model2 = _WithUnused()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    load_sharded(res.ref, {"train": TrainState(model2, opt2)})
    assert sorted(opt2.state_dict()["state"]) == [0, 1]  # the unused Linear (ids 2, 3) has none, as saved
    _assert_bitwise(flat_state(model, opt), flat_state(model2, opt2))


def test_a_model_key_missing_from_the_checkpoint_is_refused_by_name(tmp_path):
    model, opt = _trained()
    res = _save(tmp_path, model, opt)
    other = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4), torch.nn.Linear(4, 4))
    with pytest.raises(CheckpointCorrupt, match=r"train\.model\.3\.weight is not in the checkpoint"):
        load_sharded(res.ref, {"train": TrainState(other, torch.optim.AdamW(other.parameters()))})


def test_a_recorded_entry_without_a_digest_we_check_is_refused_before_loading(tmp_path):
    res = _save(tmp_path, *_trained())
    shard = next(n for n in res.ref.files if n.endswith(".distcp"))
    ref = CheckpointRef(res.path, {**res.ref.files, shard: {"bytes": res.ref.files[shard]["bytes"]}})
    state, before, m, o = _target()
    with pytest.raises(CheckpointError, match=rf"{shard}: the recorded entry carries no digest this version can check"):
        load_sharded(ref, state)
    _assert_bitwise(before, flat_state(m, o))  # nothing loaded


def test_side_files_are_hashed_with_the_shards_and_read_back_verified(tmp_path):
    from trainguard.workers.runtime.dcp_store import load_sharded_files

    model, opt = _trained()
    res = save_sharded({"train": TrainState(model, opt)}, tmp_path / "step-3", files={"state.json": b'{"step": 3}'})
    assert res.ref.files["state.json"]["bytes"] == 11
    model2, opt2 = _trained(seed=1)
    manifest, blobs = load_sharded_files(res.ref, {"train": TrainState(model2, opt2)}, ["state.json"])
    assert blobs == {"state.json": b'{"step": 3}'} and manifest["format"] == "dcp"
    (Path(res.path) / "state.json").write_bytes(b'{"step": 9}')
    with pytest.raises(CheckpointCorrupt, match="state.json"):
        load_sharded_files(res.ref, {"train": TrainState(model2, opt2)}, ["state.json"])
    with pytest.raises(ValueError, match="reserved"):
        save_sharded({"train": TrainState(model, opt)}, tmp_path / "step-4", files={".metadata": b"x"})


def test_the_model_alone_loads_in_one_process_for_the_next_stage_and_export(tmp_path):
    from trainguard.workers.model import load_model_state
    from trainguard.workers.runtime.dcp_store import load_model_state_dict

    model, opt = _trained()
    res = _save(tmp_path, model, opt)
    want = model.state_dict()
    for got in (load_model_state_dict(res.ref), load_model_state(res.ref)):  # the latter routes by format
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    shard = next(p for p in Path(res.path).iterdir() if p.name.endswith(".distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match=shard.name):
        load_model_state(res.ref)


def test_the_sharded_writer_publishes_reports_and_keeps_the_last_k(tmp_path):
    from trainguard.workers.runtime.checkpoint import Snapshot
    from trainguard.workers.runtime.dcp_store import ShardedCheckpointWriter

    model, opt = _trained()
    written = []
    w = ShardedCheckpointWriter(tmp_path, rank=0, keep_last=2, on_written=written.append)
    for step in (5, 10, 15):
        snap = Snapshot(run="r", stage="s", stage_kind="pretrain", step=step, batch_cursor=step, model={},
                        optimizer={}, extra={"x": torch.ones(2)}, rng={0: {"torch": torch.get_rng_state()}},
                        state={"step": step}, metrics={"train_loss": float("nan")}, tags=["final"] if step == 15 else [])
        w.submit(snap, frozenset(), {"train": TrainState(model, opt)})
        _step(model, opt, 1)
    assert w.wait() is written[-1]
    assert [r.step for r in written] == [5, 10, 15] and written[-1].tags == ("final",)
    assert [m["step"] for m in list_checkpoints(tmp_path / "r" / "s")] == [10, 15]
    m = verify_checkpoint(written[-1].ref)
    assert m["format"] == "dcp" and m["healthy"] is False and m["metrics"] == {"train_loss": None}
    assert {"extra.pt", "rng.pt", "state.json"} <= set(m["files"])
    with pytest.raises(ValueError, match="local or shared filesystem"):
        ShardedCheckpointWriter("memory://ckpts", rank=0)


def test_a_dcp_stage_on_an_object_store_is_refused_at_submit():
    from trainguard.workers.spec import SpecError, parse_pipeline

    stage = {"name": "pretrain", "kind": "pretrain", "steps": 4, "parallel": {"strategy": "fsdp"}}
    with pytest.raises(SpecError, match=r"checkpoint\.storage 's3://b/c': DCP checkpoints"):
        parse_pipeline({"name": "p", "checkpoint": {"storage": "s3://b/c"}, "stages": [stage]})
    # the whole-file format goes anywhere fsspec does
    spec = parse_pipeline({"name": "p", "checkpoint": {"storage": "s3://b/c", "format": "torch"}, "stages": [stage]})
    assert spec.checkpoint_format(spec.stages[0]) == "torch"
    assert parse_pipeline({"name": "p", "stages": [stage]}).checkpoint_format(spec.stages[0]) == "dcp"
