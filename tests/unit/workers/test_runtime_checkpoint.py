"""Checkpoint format: atomic, checksummed, verified on load, retention, fsspec storage."""
from __future__ import annotations

import json

import pytest
import torch

from trainguard.workers.contract import CheckpointRef
from trainguard.workers.runtime.checkpoint import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointIncomplete,
    CheckpointWriter,
    Snapshot,
    list_checkpoints,
    load_checkpoint,
    read_manifest,
    ref_from_own_manifest,
    stage_root,
    verify_checkpoint,
    write_checkpoint,
)
from trainguard.workers.runtime.faults import corrupt_file


def _snap(step: int, tags=()) -> Snapshot:
    g = torch.Generator().manual_seed(step)
    return Snapshot(run="r1", stage="pretrain", stage_kind="pretrain", step=step, batch_cursor=step,
                    model={"w": torch.randn(4, 4, generator=g)}, optimizer={"state": {}, "param_groups": []},
                    extra={"kl_coef": 0.1}, rng={0: {"torch": torch.get_rng_state()}},
                    state={"step": step, "skip": [[2, 4]]}, metrics={"train_loss": 1.0}, tags=list(tags))


def test_written_checkpoint_verifies_and_loads(tmp_path):
    res = write_checkpoint(_snap(10), tmp_path)
    m = verify_checkpoint(res.ref)
    assert m["step"] == 10 and m["healthy"] and set(m["files"]) >= {"model.pt", "optimizer.pt", "rng.pt", "state.json"}
    assert set(res.ref.files) == set(m["files"]) | {"manifest.json"} and res.ref.path == res.path
    ck = load_checkpoint(res.ref)
    assert torch.equal(ck["model"]["w"], _snap(10).model["w"]) and ck["state"]["skip"] == [[2, 4]]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "r1" / "pretrain").iterdir())


def test_checkpoint_without_manifest_is_incomplete_not_corrupt_and_never_loads(tmp_path):
    res = write_checkpoint(_snap(10), tmp_path)
    (tmp_path / "r1" / "pretrain" / "step-00000010" / "manifest.json").unlink()
    with pytest.raises(CheckpointIncomplete, match="manifest.json"):
        load_checkpoint(res.ref)
    with pytest.raises(CheckpointIncomplete):
        verify_checkpoint(res.ref)
    assert list_checkpoints(stage_root(tmp_path, "r1", "pretrain")) == []


@pytest.mark.parametrize("name", ["model.pt", "optimizer.pt", "rng.pt", "state.json"])
def test_flipped_byte_never_loads_and_names_the_file(tmp_path, name):
    res = write_checkpoint(_snap(10), tmp_path)
    corrupt_file(f"{res.path}/{name}")
    with pytest.raises(CheckpointCorrupt, match=name):
        verify_checkpoint(res.ref)
    with pytest.raises(CheckpointCorrupt, match=name):
        load_checkpoint(res.ref)


def test_retention_keeps_last_k_and_tagged(tmp_path):
    w = CheckpointWriter(tmp_path, asynchronous=True, keep_last=2)
    for step, tags in [(5, ["keep"]), (10, ["best"]), (15, []), (20, ["best"]), (25, []), (30, [])]:
        w.submit(_snap(step, tags))
    w.wait()
    steps = [m["step"] for m in list_checkpoints(stage_root(tmp_path, "r1", "pretrain"))]
    assert steps == [5, 20, 25, 30]


def test_async_writer_files_verify(tmp_path):
    w = CheckpointWriter(tmp_path, asynchronous=True, keep_last=5)
    for step in (1, 2, 3):
        assert w.submit(_snap(step)) >= 0.0
    res = w.wait()
    assert res.step == 3
    assert [r.step for r in w.results] == [1, 2, 3]
    for r in w.results:
        verify_checkpoint(r.ref)


def test_rewriting_a_step_replaces_the_old_checkpoint(tmp_path):
    write_checkpoint(_snap(10), tmp_path)
    snap = _snap(10)
    snap.model["w"] = torch.zeros(4, 4)
    res = write_checkpoint(snap, tmp_path)
    assert torch.equal(load_checkpoint(res.ref)["model"]["w"], torch.zeros(4, 4))
    assert [p.name for p in (tmp_path / "r1" / "pretrain").iterdir()] == ["step-00000010"]


def test_fsspec_memory_storage_round_trip():
    root = "memory://tg-ckpt-test"
    res = write_checkpoint(_snap(7), root)
    assert res.path.startswith("memory://")
    assert read_manifest(res.path)["step"] == 7
    assert [m["step"] for m in list_checkpoints(stage_root(root, "r1", "pretrain"))] == [7]
    corrupt_file(res.path + "/model.pt")
    with pytest.raises(CheckpointCorrupt, match="model.pt"):
        load_checkpoint(res.ref)


def test_nonfinite_metrics_make_the_checkpoint_unhealthy(tmp_path):
    snap = _snap(3)
    snap.metrics = {"train_loss": float("nan")}
    res = write_checkpoint(snap, tmp_path)
    m = json.loads((tmp_path / "r1" / "pretrain" / "step-00000003" / "manifest.json").read_text())
    assert m["healthy"] is False and m["metrics"]["train_loss"] is None and res.manifest["healthy"] is False


class _Payload:
    """Unpickling this runs code: it creates the file named by `marker`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, name: str, marker) -> None:
    """What someone with write access to the storage does: replace a file with a pickle that runs
    code, and recompute the folder's manifest so the folder vouches for it."""
    import hashlib
    import io
    import pickle

    buf = io.BytesIO()
    pickle.dump({"kl_coef": _Payload(str(marker))}, buf)
    data = buf.getvalue()
    (path / name).write_bytes(data)
    m = json.loads((path / "manifest.json").read_text())
    m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("name", ["extra.pt", "rng.pt", "model.pt"])
def test_a_planted_pickle_with_a_recomputed_manifest_is_never_deserialized(tmp_path, name):
    res = write_checkpoint(_snap(10), tmp_path / "store")
    marker = tmp_path / "pwned"
    _plant(tmp_path / "store" / "r1" / "pretrain" / "step-00000010", name, marker)
    # the recorded hashes (from the worker's report) do not vouch for the new folder
    with pytest.raises(CheckpointIncomplete, match="manifest.json"):
        load_checkpoint(res.ref)
    assert not marker.exists()


def test_every_file_loads_weights_only_even_when_its_hash_is_vouched_for(tmp_path):
    """Defence in depth: a pickle that would run code is refused by the loader itself."""
    write_checkpoint(_snap(10), tmp_path / "store")
    marker = tmp_path / "pwned"
    _plant(tmp_path / "store" / "r1" / "pretrain" / "step-00000010", "extra.pt", marker)
    trusted_anyway = ref_from_own_manifest(tmp_path / "store" / "r1" / "pretrain" / "step-00000010")
    with pytest.raises(CheckpointError, match="extra.pt: cannot be loaded"):
        load_checkpoint(trusted_anyway)
    assert not marker.exists()


def test_a_reference_without_recorded_hashes_is_refused():
    with pytest.raises(ValueError, match="recorded hashes"):
        CheckpointRef.from_dict({"path": "/tmp/x", "files": {}})
