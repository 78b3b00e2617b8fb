"""The checkpoint catalog against real folders and a real store: reported bytes verify,
flipped bytes are quarantined with an incident, a deleted folder is marked deleted without
one, and the resume point is the newest good checkpoint that still verifies."""
from __future__ import annotations

from trainguard.service.supervisor.catalog import CheckpointCatalog
from trainguard.service.telemetry import SupervisorMetrics

from tests.unit.service.supervisor.fakes import _digest, checkpoint_folder, ledger_in, new_run


def _catalog(tmp_path):
    ledger = ledger_in(tmp_path)
    return ledger, CheckpointCatalog(ledger, SupervisorMetrics().incidents), new_run(ledger)


def test_reported_checkpoints_verify_and_flipped_bytes_are_quarantined_once(tmp_path):
    ledger, catalog, run_id = _catalog(tmp_path)
    reports = [checkpoint_folder(tmp_path / "ck", s) for s in (10, 20)]
    catalog.register(run_id, "pretrain", reports)
    catalog.scan([run_id])
    assert [c.step for c in ledger.checkpoints(run_id, "pretrain", good_only=True)] == [10, 20]
    (tmp_path / "ck" / "step-00000020" / "model.pt").write_bytes(b"someone else's bytes")
    catalog.scan([run_id])
    catalog.scan([run_id])
    assert [c.step for c in ledger.checkpoints(run_id, "pretrain", good_only=True)] == [10]
    (inc,) = ledger.stage_incidents(run_id, "pretrain")
    assert (inc.kind, inc.action, inc.onset_step) == ("checkpoint_corrupt", "quarantine", 20)
    assert catalog.resume_point(run_id, "pretrain").path == reports[0].ref.path


def test_a_deleted_checkpoint_is_gone_not_corrupt(tmp_path):
    ledger, catalog, run_id = _catalog(tmp_path)
    catalog.register(run_id, "pretrain", [checkpoint_folder(tmp_path / "ck", 10)])
    (tmp_path / "ck" / "step-00000010" / "manifest.json").unlink()  # retention deletes the manifest first
    assert catalog.verified_now(run_id, str(tmp_path / "ck" / "step-00000010")) is False
    assert ledger.checkpoints(run_id) == [] and ledger.stage_incidents(run_id, "pretrain") == []
    assert catalog.resume_point(run_id, "pretrain") is None


def test_a_new_report_at_the_same_path_is_checked_again(tmp_path):
    """A step rewritten after a rollback: the new hashes are the trust anchor, the old verdict is dropped."""
    ledger, catalog, run_id = _catalog(tmp_path)
    catalog.register(run_id, "pretrain", [checkpoint_folder(tmp_path / "ck", 10)])
    catalog.scan([run_id])
    rewritten = checkpoint_folder(tmp_path / "ck", 10, lr_multiplier=0.5)  # same bytes, so hashes agree
    (tmp_path / "ck" / "step-00000010" / "model.pt").write_bytes(b"rewritten weights")
    rewritten.ref.files["model.pt"] = _digest(b"rewritten weights")
    catalog.register(run_id, "pretrain", [rewritten])
    catalog.scan([run_id])
    assert [c.step for c in ledger.checkpoints(run_id, "pretrain", good_only=True)] == [10]
    assert catalog.ref_for(run_id, rewritten.ref.path).files == rewritten.ref.files


def test_checkpoints_reported_with_sha256_still_verify_and_flips_are_still_caught(tmp_path):
    """Rows stored before BLAKE3 carry {"sha256", "bytes"}: they stay good and resumable."""
    ledger, catalog, run_id = _catalog(tmp_path)
    reports = [checkpoint_folder(tmp_path / "ck", s, digest="sha256") for s in (10, 20)]
    assert all("sha256" in e and "blake3" not in e for r in reports for e in r.ref.files.values())
    catalog.register(run_id, "pretrain", reports)
    catalog.scan([run_id])
    assert catalog.resume_point(run_id, "pretrain").path == reports[1].ref.path
    (tmp_path / "ck" / "step-00000020" / "model.pt").write_bytes(b"weights of step 21")  # same size
    assert catalog.verified_now(run_id, reports[1].ref.path) is False
    (inc,) = ledger.stage_incidents(run_id, "pretrain")
    assert (inc.kind, inc.onset_step) == ("checkpoint_corrupt", 20) and "(sha256 " in inc.evidence["error"]
    assert catalog.resume_point(run_id, "pretrain").path == reports[0].ref.path


def test_a_row_whose_entries_carry_no_digest_we_check_is_never_resumed_from(tmp_path):
    ledger, catalog, run_id = _catalog(tmp_path)
    report = checkpoint_folder(tmp_path / "ck", 10)
    report.ref.files["model.pt"] = {"md5": "0" * 32, "bytes": report.ref.files["model.pt"]["bytes"]}
    catalog.register(run_id, "pretrain", [report])
    assert catalog.verified_now(run_id, report.ref.path) is False
    assert catalog.resume_point(run_id, "pretrain") is None
