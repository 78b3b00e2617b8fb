"""Checkpoints on a real S3-compatible server (moto's standalone server, the `s3_server`
fixture): the step loop writes, verifies, retains, rolls back and resumes through `s3://`
exactly as on a local folder, a flipped byte is refused naming the file, and the supervisor's
catalog scans the bucket from listings without reading the checkpoints."""
from __future__ import annotations

import fsspec
import pytest
import torch

from trainguard.service.supervisor.catalog import CheckpointCatalog
from trainguard.service.telemetry import SupervisorMetrics
from trainguard.workers.contract import Control, ControlKind
from trainguard.workers.runtime import checkpoint as ckpt_mod
from trainguard.workers.runtime.checkpoint import (
    CheckpointCorrupt, CheckpointIncomplete, list_checkpoints, read_verified, stage_root, verify_checkpoint,
)
from trainguard.workers.runtime.faults import corrupt_file
from trainguard.workers.runtime.harness import Harness, make_context

from tests.unit.service.supervisor.fakes import ledger_in, new_run
from tests.unit.workers._tiny import TinyStage, stop_at, tiny_spec, weights

pytestmark = pytest.mark.integration

torch.set_num_threads(1)


def _harness(spec, state_dir, root: str, **kw) -> Harness:
    ctx = make_context(spec, "pretrain", run_id="run1", device=torch.device("cpu"))
    return Harness(TinyStage(ctx), spec=spec, stage_name="pretrain", run_id="run1", state_dir=state_dir,
                   checkpoint_root=root, **kw)


def _objects(prefix: str) -> list[str]:
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    return sorted(p.split("/run1/pretrain/", 1)[1] for p in fs.find(prefix.removeprefix("s3://")))


def test_write_verify_and_retention_on_the_s3_server(s3_server, tmp_path):
    root = s3_server.prefix()
    h = _harness(tiny_spec(steps=20), tmp_path, root)  # a checkpoint every 5 steps, keep_last 3
    assert h.run()["state"] == "finished"
    ckpts = list_checkpoints(stage_root(root, "run1", "pretrain"))
    assert [c["step"] for c in ckpts] == [10, 15, 20]
    assert all(c["path"].startswith(f"{root}/run1/pretrain/step-") for c in ckpts)
    for c in ckpts:
        m = verify_checkpoint(h.own[c["path"]])  # the reported hashes, read back from the server
        assert m["step"] == c["step"] and set(m["files"]) == set(h.own[c["path"]].files) - {"manifest.json"}
    # retention deleted step 5 entirely (manifest first, then the rest): no object left behind,
    # and the ones kept are complete, with nothing written beside them (no .tmp folders)
    names = _objects(f"{root}/run1/pretrain")
    assert {n.split("/")[0] for n in names} == {"step-00000010", "step-00000015", "step-00000020"}
    assert sorted(n.split("/")[1] for n in names if n.startswith("step-00000020/")) == sorted(
        ["extra.pt", "manifest.json", "model.pt", "optimizer.pt", "rng.pt", "state.json"])
    # the stage's output points into the bucket
    assert h.result()["output_checkpoint"] == f"{root}/run1/pretrain/step-00000020"


def test_a_flipped_byte_on_s3_is_refused_naming_the_file_and_nothing_is_loaded(s3_server, tmp_path):
    root = s3_server.prefix()
    spec = tiny_spec(steps=12, faults=[{"kind": "checkpoint_corrupt", "at_step": 4}])
    h = _harness(spec, tmp_path, root)
    h.run()
    ck = {m["step"]: m["path"] for m in list_checkpoints(stage_root(root, "run1", "pretrain"))}
    with pytest.raises(CheckpointCorrupt, match=r"s3://.*step-00000005/model\.pt: checksum mismatch"):
        verify_checkpoint(h.own[ck[5]])
    verify_checkpoint(h.own[ck[10]])
    before = weights(h)
    with pytest.raises(CheckpointCorrupt, match=r"model\.pt"):
        h.rollback(ck[5], [], None)
    after = weights(h)
    assert h.step == 12 and all(torch.equal(before[k], after[k]) for k in before)
    # a checkpoint whose manifest is gone (retention's first delete) is incomplete, not corrupt
    st, p = ckpt_mod.storage_for(ck[10])
    st.remove_tree(st.join(p, "manifest.json"))
    with pytest.raises(CheckpointIncomplete):
        read_verified(h.own[ck[10]])


def test_rollback_in_process_and_exact_resume_through_s3(s3_server, tmp_path):
    """A rollback to a checkpoint in the bucket replays on the batches after the skip; a second
    process resumed from the bucket reaches the weights of one that never stopped, bit for bit."""
    root = s3_server.prefix()
    spec = tiny_spec(steps=24)
    rolled_back: list[bool] = []

    def hook(h: Harness) -> None:
        if h.step == 12 and not rolled_back:
            rolled_back.append(True)
            h.writer.wait()
            ck = list_checkpoints(stage_root(root, "run1", "pretrain"))[-1]["path"]
            assert ck.endswith("step-00000010")
            h.inbox.put(Control(ControlKind.ROLLBACK, 1, {"checkpoint": h.own[ck].to_dict(), "skip": [[10, 14]]}))

    h = _harness(spec, tmp_path / "rb", root, on_step=hook)
    assert h.run()["state"] == "finished"
    by_step: dict[int, list[int]] = {}
    for r in h.exporter.history(0):
        by_step.setdefault(r["step"], []).append(r["batch_index"])
    assert by_step[11] == [10, 14] and h.cursor.skip == [[10, 14]]

    full = _harness(spec, tmp_path / "a", s3_server.prefix())
    full.run()
    root2 = s3_server.prefix()
    first = _harness(spec, tmp_path / "b", root2, on_step=stop_at(7))
    out = first.run()
    assert out["state"] == "stopped" and out["last_checkpoint"] == f"{root2}/run1/pretrain/step-00000007"
    second = _harness(spec, tmp_path / "c", root2, resume_from=first.own[out["last_checkpoint"]])
    assert second.step == 7
    second.run()
    a, b = weights(full), weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_catalog_scans_the_bucket_from_listings_and_rereads_only_what_changed(s3_server, tmp_path, monkeypatch):
    root = s3_server.prefix()
    h = _harness(tiny_spec(steps=15), tmp_path / "w", root)
    h.run()
    ledger = ledger_in(tmp_path)
    run_id = new_run(ledger)
    catalog = CheckpointCatalog(ledger, SupervisorMetrics().incidents)
    catalog.register(run_id, "pretrain", list(h.reports))
    reads: list[str] = []
    real_read = ckpt_mod.FsspecStorage.read_bytes

    def counting(self, path):
        reads.append(path.rsplit("/", 1)[-1])
        return real_read(self, path)

    monkeypatch.setattr(ckpt_mod.FsspecStorage, "read_bytes", counting)
    catalog.scan([run_id])  # first sight: listings and each manifest, no weights
    assert sorted(reads) == ["manifest.json"] * 3, reads
    reads.clear()
    catalog.scan([run_id])
    catalog.scan([run_id])
    assert reads == [], "an unchanged bucket is scanned without reading an object"
    # a byte flipped in place (same size, new ETag): that file and the manifest are read again
    monkeypatch.setattr(ckpt_mod.FsspecStorage, "read_bytes", real_read)
    corrupt_file(f"{root}/run1/pretrain/step-00000010/optimizer.pt")
    monkeypatch.setattr(ckpt_mod.FsspecStorage, "read_bytes", counting)
    catalog.scan([run_id])
    # (the manifest twice: checked first, and again to tell corrupt from deleted meanwhile)
    assert sorted(reads) == ["manifest.json", "manifest.json", "optimizer.pt"], reads
    assert [c.step for c in ledger.checkpoints(run_id, "pretrain", good_only=True)] == [5, 15]
    (inc,) = ledger.stage_incidents(run_id, "pretrain")
    assert (inc.kind, inc.onset_step) == ("checkpoint_corrupt", 10) and "optimizer.pt" in str(inc.evidence)
    # right before a use every byte is read and hashed
    reads.clear()
    ref = catalog.resume_point(run_id, "pretrain")
    assert ref is not None and ref.path.endswith("step-00000015")
    assert sorted(reads) == sorted(h.own[ref.path].files), reads
    # retention's delete (manifest first) makes a checkpoint gone, never corrupt
    st, p = ckpt_mod.storage_for(ref.path)
    st.remove_tree(st.join(p, "manifest.json"))
    catalog.scan([run_id])
    assert [c.step for c in ledger.checkpoints(run_id, "pretrain")] == [5, 10]  # 15 deleted, 10 quarantined
    assert len(ledger.stage_incidents(run_id, "pretrain")) == 1
