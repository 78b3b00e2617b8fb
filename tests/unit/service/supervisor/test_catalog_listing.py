"""The catalog's change signature on an fsspec store (memory://, no server): a scan lists the
folder and reads no checkpoint file again while its listing is unchanged; a rewritten file is
read again on its own; a use reads every byte. (The same against a real S3 server:
tests/integration/store/test_s3_checkpoints.py.)"""
from __future__ import annotations

import hashlib
import uuid

from trainguard.service.supervisor.catalog import CheckpointCatalog
from trainguard.service.telemetry import SupervisorMetrics
from trainguard.workers.contract import CheckpointRef, CheckpointReport
from trainguard.workers.runtime import checkpoint as ckpt_mod

from tests.unit.service.supervisor.fakes import ledger_in, new_run


def _digest(b: bytes) -> dict:
    return {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)}


def _remote_checkpoint(root: str, step: int) -> CheckpointReport:
    st, p = ckpt_mod.storage_for(f"{root}/step-{step:08d}")
    files = {"model.pt": f"weights {step}".encode(), "rng.pt": b"rng", "manifest.json": f'{{"step": {step}}}'.encode()}
    for name, data in files.items():
        st.write_bytes(st.join(p, name), data)
    ref = CheckpointRef(st.display(p), {n: _digest(d) for n, d in files.items()})
    return CheckpointReport(seq=step, ref=ref, step=step, batch_cursor=step, healthy=True)


def test_an_fsspec_store_is_scanned_from_listings(tmp_path, monkeypatch):
    root = f"memory://tg-catalog-{uuid.uuid4().hex[:8]}"
    ledger = ledger_in(tmp_path)
    run_id = new_run(ledger)
    catalog = CheckpointCatalog(ledger, SupervisorMetrics().incidents)
    catalog.register(run_id, "pretrain", [_remote_checkpoint(root, 10), _remote_checkpoint(root, 20)])
    reads: list[str] = []
    real = ckpt_mod.FsspecStorage.read_bytes
    monkeypatch.setattr(ckpt_mod.FsspecStorage, "read_bytes",
                        lambda self, path: reads.append(path.rsplit("/", 1)[-1]) or real(self, path))
    catalog.scan([run_id])
    assert sorted(reads) == ["manifest.json", "manifest.json"]  # first sight: manifests and sizes only
    reads.clear()
    catalog.scan([run_id])
    assert reads == []
    # a file rewritten with its size kept: only it (and the manifest) are read again
    st, p = ckpt_mod.storage_for(f"{root}/step-00000020/model.pt")
    st.write_bytes(p, b"weights 99")
    catalog.scan([run_id])
    assert sorted(reads) == ["manifest.json", "manifest.json", "model.pt"]
    assert [c.step for c in ledger.checkpoints(run_id, "pretrain", good_only=True)] == [10]
    (inc,) = ledger.stage_incidents(run_id, "pretrain")
    assert inc.kind == "checkpoint_corrupt" and "step-00000020/model.pt" in str(inc.evidence)
    # a recorded file missing from the listing on first sight is read, and so named
    catalog2 = CheckpointCatalog(ledger, SupervisorMetrics().incidents)
    st.remove_tree(st.join(p.rsplit("/", 2)[0], "step-00000010", "rng.pt"))
    catalog2.scan([run_id])
    assert ledger.checkpoints(run_id, "pretrain", good_only=True) == []
    assert any("step-00000010/rng.pt: missing" in str(i.evidence) for i in ledger.stage_incidents(run_id, "pretrain"))
    # before a use: every byte, however recently the listing was checked
    rep = _remote_checkpoint(root, 30)
    catalog.register(run_id, "pretrain", [rep])
    catalog.scan([run_id])
    reads.clear()
    assert catalog.verified_now(run_id, rep.ref.path) is True
    assert sorted(reads) == ["manifest.json", "model.pt", "rng.pt"]


def test_an_unreachable_store_changes_no_verdict_in_a_scan(tmp_path, monkeypatch):
    root = f"memory://tg-catalog-{uuid.uuid4().hex[:8]}"
    ledger = ledger_in(tmp_path)
    run_id = new_run(ledger)
    catalog = CheckpointCatalog(ledger, SupervisorMetrics().incidents)
    catalog.register(run_id, "pretrain", [_remote_checkpoint(root, 10)])

    def down(self, path):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(ckpt_mod.FsspecStorage, "listing", down)
    catalog.scan([run_id])
    assert [c.step for c in ledger.checkpoints(run_id, "pretrain", good_only=True)] == [10]
    assert ledger.stage_incidents(run_id, "pretrain") == []


def test_a_read_that_fails_in_a_scan_is_no_verdict_on_an_object_store(tmp_path, monkeypatch):
    root = f"memory://tg-catalog-{uuid.uuid4().hex[:8]}"
    ledger = ledger_in(tmp_path)
    run_id = new_run(ledger)
    catalog = CheckpointCatalog(ledger, SupervisorMetrics().incidents)
    catalog.register(run_id, "pretrain", [_remote_checkpoint(root, 10)])

    def reset(self, path):
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(ckpt_mod.FsspecStorage, "read_bytes", reset)
    catalog.scan([run_id])
    assert [c.step for c in ledger.checkpoints(run_id, "pretrain", good_only=True)] == [10]
