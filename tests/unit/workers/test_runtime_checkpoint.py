"""Checkpoint format: atomic, checksummed, verified on load, retention, fsspec storage."""
from __future__ import annotations

import io
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
    import io
    import pickle

    import blake3

    buf = io.BytesIO()
    pickle.dump({"kl_coef": _Payload(str(marker))}, buf)
    data = buf.getvalue()
    (path / name).write_bytes(data)
    m = json.loads((path / "manifest.json").read_text())
    m["files"][name] = {"blake3": blake3.blake3(data).hexdigest(), "bytes": len(data)}
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


# -- digests: BLAKE3 recorded, sha256 (older checkpoints) still verified, anything else refused ---------
def _as_sha256(res) -> CheckpointRef:
    """The checkpoint of `res` as one written before BLAKE3 would be recorded: its folder's manifest
    and the reference carry {"sha256", "bytes"} for every file."""
    import hashlib
    from pathlib import Path

    folder = Path(res.path)
    old = lambda data: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}  # noqa: E731
    m = json.loads((folder / "manifest.json").read_bytes())
    m["files"] = {name: old((folder / name).read_bytes()) for name in m["files"]}
    raw = json.dumps(m, indent=1, sort_keys=True).encode()
    (folder / "manifest.json").write_bytes(raw)
    return CheckpointRef(res.path, {**m["files"], "manifest.json": old(raw)})


def test_new_checkpoints_record_blake3_and_a_flipped_byte_is_caught_by_it(tmp_path):
    import blake3

    res = write_checkpoint(_snap(10), tmp_path)
    for name, entry in res.ref.files.items():
        data = (tmp_path / "r1" / "pretrain" / "step-00000010" / name).read_bytes()
        assert entry == {"blake3": blake3.blake3(data).hexdigest(), "bytes": len(data)}, name
    corrupt_file(f"{res.path}/model.pt")  # same size, one byte different: only the digest tells
    with pytest.raises(CheckpointCorrupt, match=r"model\.pt: checksum mismatch \(blake3 "):
        load_checkpoint(res.ref)


def test_a_checkpoint_recorded_with_sha256_still_verifies_loads_and_catches_a_flip(tmp_path):
    res = write_checkpoint(_snap(10), tmp_path)
    old = _as_sha256(res)
    assert all(set(e) == {"sha256", "bytes"} for e in old.files.values())
    assert verify_checkpoint(old)["step"] == 10
    assert torch.equal(load_checkpoint(old)["model"]["w"], _snap(10).model["w"])
    assert ref_from_own_manifest(res.path).files["model.pt"] == old.files["model.pt"]
    corrupt_file(f"{res.path}/optimizer.pt")
    with pytest.raises(CheckpointCorrupt, match=r"optimizer\.pt: checksum mismatch \(sha256 "):
        load_checkpoint(old)


@pytest.mark.parametrize("name", ["model.pt", "manifest.json"])
@pytest.mark.parametrize("entry", [{"bytes": 5}, {"md5": "0" * 32, "bytes": 5}, {"blake3": None, "bytes": 5}, "x"])
def test_a_recorded_entry_without_a_digest_we_check_is_refused_clearly(tmp_path, name, entry):
    res = write_checkpoint(_snap(10), tmp_path)
    ref = CheckpointRef(res.path, {**res.ref.files, name: entry})
    with pytest.raises(CheckpointError, match=rf"{name}: the recorded entry carries no digest this version can "
                                              r"check \(.*expected one of blake3, sha256\); refused") as e:
        load_checkpoint(ref)
    assert not isinstance(e.value, (CheckpointCorrupt, CheckpointIncomplete))  # the record, not the files


def test_digest_mismatch_names_what_differs():
    from trainguard.workers.runtime.checkpoint import digest_mismatch, file_digest

    want = file_digest(b"abc")
    assert digest_mismatch(b"abc", want) is None
    assert digest_mismatch(b"abd", want).startswith("blake3 ")
    assert digest_mismatch(b"abcd", want) == "size 4 bytes, recorded 3"
    assert digest_mismatch(b"abc", {"sha256": __import__("hashlib").sha256(b"abc").hexdigest()}) is None
    with pytest.raises(ValueError, match="no digest"):
        digest_mismatch(b"abc", {"bytes": 3})


# -- the write path: streamed, hashed in the same pass, no CRC ---------------------------------------
def test_files_are_hashed_as_written_large_tensors_included(tmp_path):
    """Tensors above the overlap threshold are hashed beside their write: the recorded hashes
    are those of the bytes on disk (BLAKE3), and the checkpoint loads back exactly."""
    import blake3

    from trainguard.workers.runtime import checkpoint as ck

    snap = _snap(4)
    big = torch.randn(3 * ck._OVERLAP_MIN // 4 + 17)  # ~3x the threshold in bytes, odd size
    snap.model = {"big": big, "w": snap.model["w"]}
    snap.optimizer = {"state": {0: {"exp_avg": big * 2, "step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]}
    res = write_checkpoint(snap, tmp_path)
    for name, want in res.manifest["files"].items():
        data = (tmp_path / "r1" / "pretrain" / "step-00000004" / name).read_bytes()
        assert want == {"blake3": blake3.blake3(data).hexdigest(), "bytes": len(data)}, name
    assert res.ref.files["model.pt"] == res.manifest["files"]["model.pt"]
    ck_ = load_checkpoint(res.ref)
    assert torch.equal(ck_["model"]["big"], big) and torch.equal(ck_["optimizer"]["state"][0]["exp_avg"], big * 2)
    assert res.bytes == sum(f["bytes"] for f in res.manifest["files"].values())


def _zip_records(data: bytes) -> dict[str, tuple[int, int, bytes]]:
    """name -> (offset of the record's local header, CRC-32 as recorded, stored bytes), read
    without zipfile's CRC check."""
    import struct
    import zipfile

    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            n, m = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
            start = info.header_offset + 30 + n + m
            out[info.filename] = (info.header_offset, info.CRC, data[start:start + info.file_size])
    return out


def test_serialisation_is_torch_save_without_the_crc(monkeypatch):
    """`_torch_save` is torch.save with the per-record CRC-32 left out (BLAKE3 vouches for the
    bytes), through torch's private writer API. On the pinned torch it must not fall back to
    torch.save, and its file must be torch.save's record for record — same names, same offsets,
    same bytes (but the random serialization id) — with every CRC 0; torch.load (weights_only)
    reads it. A torch whose writer or `_save` behaves otherwise fails here."""
    from trainguard.workers.runtime import checkpoint as ck

    torch.manual_seed(0)
    obj = {"w": torch.randn(300, 7), "tied": None, "n": 3, "rng": [torch.get_rng_state()],
           "half": torch.randn(5).to(torch.bfloat16), "empty": torch.zeros(0)}
    obj["tied"] = obj["w"]
    ref = io.BytesIO()
    torch.save(obj, ref)
    assert ck._CRC_FREE_SAVE
    monkeypatch.setattr(torch, "save", lambda *a, **k: pytest.fail("fell back to torch.save"))
    buf = io.BytesIO()
    ck._torch_save(obj, buf)
    ours, theirs = _zip_records(buf.getvalue()), _zip_records(ref.getvalue())
    assert len(buf.getvalue()) == len(ref.getvalue()) and list(ours) == list(theirs)
    for name, (offset, crc, data) in ours.items():
        assert offset == theirs[name][0] and crc == 0, name
        if not name.endswith("serialization_id"):
            assert data == theirs[name][2], name
    got = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert torch.equal(got["w"], obj["w"]) and got["tied"] is got["w"] and got["n"] == 3
    assert torch.equal(got["rng"][0], obj["rng"][0]) and torch.equal(got["half"], obj["half"])


def test_serialisation_falls_back_to_torch_save(monkeypatch):
    from trainguard.workers.runtime import checkpoint as ck

    monkeypatch.setattr(ck, "_CRC_FREE_SAVE", False)
    buf = io.BytesIO()
    ck._torch_save({"w": torch.ones(3)}, buf)
    assert all(crc != 0 for _, crc, _ in _zip_records(buf.getvalue()).values())
    assert torch.equal(torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["w"], torch.ones(3))


def test_a_failed_serialisation_leaves_no_complete_checkpoint(tmp_path):
    snap = _snap(6)
    snap.model = {"w": torch.zeros(2), "bad": lambda: None}  # not picklable
    with pytest.raises(Exception):
        write_checkpoint(snap, tmp_path)
    assert list_checkpoints(stage_root(tmp_path, "r1", "pretrain")) == []
    assert list((tmp_path / "r1" / "pretrain").iterdir()) == []  # its temporary folder is gone too
    root = "memory://tg-ckpt-failed"
    with pytest.raises(Exception):
        write_checkpoint(snap, root)
    assert list_checkpoints(stage_root(root, "r1", "pretrain")) == []


# -- staging: reused buffers, copies deferred until the optimizer's next step -------------------------
def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    model[1].weight = model[0].weight  # tied: one buffer, as torch.save of the live state shares it
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    return model, opt


def test_staging_reuses_its_buffers_and_keeps_tied_weights_shared():
    from trainguard.workers.runtime.checkpoint import StagingBuffers

    model, _ = _model_and_optimizer()
    st = StagingBuffers()
    a = st.copy(model.state_dict())
    assert a["0.weight"] is a["1.weight"] and a["0.weight"].data_ptr() != model[0].weight.data_ptr()
    ptrs = {k: v.data_ptr() for k, v in a.items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    b = st.copy(model.state_dict())
    assert {k: v.data_ptr() for k, v in b.items()} == ptrs and st.allocated == 3  # weight, 2 biases
    assert torch.equal(b["0.weight"], model[0].weight) and not b["0.weight"].requires_grad
    c = st.copy({"0.weight": torch.zeros(3, 3)})  # a new shape: a new buffer
    assert st.allocated == 4 and torch.equal(c["0.weight"], torch.zeros(3, 3))


@pytest.mark.parametrize("submitted", [True, False])
def test_a_deferred_staging_copy_finishes_before_the_optimizer_step(tmp_path, monkeypatch, submitted):
    """`stage(..., until=opt)` returns before the copy is made; the writer thread makes it, and
    the optimizer's next step waits for it (or makes it itself when nothing was submitted yet),
    so the checkpoint holds the weights of the step it was taken at."""
    import time

    from trainguard.workers.runtime import checkpoint as ck

    real = ck._copy_pairs

    def slow(pairs):
        time.sleep(0.2)
        real(pairs)

    monkeypatch.setattr(ck, "_copy_pairs", slow)
    model, opt = _model_and_optimizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    before_opt = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    w = CheckpointWriter(tmp_path, asynchronous=True, keep_last=5)
    t0 = time.perf_counter()
    model_sd = w.stage("model", model.state_dict(), until=opt)
    optim_sd = w.stage("optimizer", opt.state_dict(), until=opt)
    assert time.perf_counter() - t0 < 0.15, "stage() made the deferred copy itself"
    snap = _snap(1)
    snap.model, snap.optimizer = model_sd, optim_sd
    if submitted:
        w.submit(snap)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()  # waits until the staging copy is made, then changes the weights
    assert w.staging_wait_s >= 0.1
    if not submitted:
        w.submit(snap)
    res = w.wait()
    assert res is not None
    got = load_checkpoint(res.ref)
    assert all(torch.equal(got["model"][k], before[k]) for k in before)
    assert all(torch.equal(got["optimizer"]["state"][0][k], before_opt[k]) for k in before_opt)
    assert not torch.equal(model[0].weight.detach(), before["0.weight"])


def test_staging_without_an_optimizer_copies_before_it_returns(tmp_path):
    model, opt = _model_and_optimizer()
    w = CheckpointWriter(tmp_path)
    sd = w.stage("model", model.state_dict())
    with torch.no_grad():
        model[0].bias.add_(1.0)  # changed right after: the copy must already be done
    assert not torch.equal(sd["0.bias"], model[0].bias)
    assert w.staging_wait_s == 0.0


def test_a_failed_staging_copy_fails_its_write_not_the_training_step(tmp_path, monkeypatch):
    from trainguard.workers.runtime import checkpoint as ck

    def broken(pairs):
        raise RuntimeError("copy failed")

    monkeypatch.setattr(ck, "_copy_pairs", broken)
    model, opt = _model_and_optimizer()
    w = CheckpointWriter(tmp_path)
    snap = _snap(2)
    snap.model = w.stage("model", model.state_dict(), until=opt)
    w.submit(snap)
    opt.step()  # not raised here
    with pytest.raises(CheckpointError, match="copy failed"):
        w.wait()
    assert list_checkpoints(stage_root(tmp_path, "r1", "pretrain")) == []
    monkeypatch.undo()
    snap = _snap(3)
    snap.model = w.stage("model", model.state_dict(), until=opt)  # the writer goes on
    w.submit(snap)
    assert w.wait() is not None and w.wait().step == 3


def test_copy_staged_makes_the_deferred_copy_in_the_writer_thread_without_a_write(tmp_path, monkeypatch):
    """A rank that keeps its own copy of a checkpoint another rank writes: the copy runs in the
    writer thread (the optimizer's step finds it done), holds the staged state, and nothing is
    written; a failed copy is raised by the next wait."""
    import threading
    import time

    from trainguard.workers.runtime import checkpoint as ck

    real, threads = ck._copy_pairs, []

    def recording(pairs):
        threads.append(threading.current_thread().name)
        real(pairs)

    monkeypatch.setattr(ck, "_copy_pairs", recording)
    model, opt = _model_and_optimizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = CheckpointWriter(tmp_path, asynchronous=True, keep_last=5)
    kept = w.stage("model", model.state_dict(), until=opt)
    w.copy_staged()
    deadline = time.monotonic() + 10
    while not threads and time.monotonic() < deadline:
        time.sleep(0.01)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    assert threads == ["ckpt-write"]  # not the training thread (its pre-step hook would have made it)
    assert all(torch.equal(kept[k], before[k]) for k in before)
    assert not torch.equal(model[0].weight.detach(), before["0.weight"])
    assert w.wait() is None and list_checkpoints(stage_root(tmp_path, "r1", "pretrain")) == []

    def broken(pairs):
        raise RuntimeError("copy failed")

    monkeypatch.setattr(ck, "_copy_pairs", broken)
    w.stage("model", model.state_dict(), until=opt)
    w.copy_staged()
    with pytest.raises(CheckpointError, match="copy failed"):
        w.wait()
