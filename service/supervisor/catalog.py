"""The checkpoint catalog: which checkpoints a run has, whether they still hold the bytes their
worker wrote, and which one a stage resumes from.

The only checkpoints registered are the ones rank 0 reported (path + the digest of every file:
BLAKE3, or sha256 for checkpoints written before it), so a folder nobody reported is never
trusted. They are re-verified against those recorded hashes: a missing manifest, or another
checkpoint's, means deleted (retention, a rollback, a step rewritten), never corrupt; only bytes
that differ under the recorded manifest are corruption, and are quarantined with an incident.

Scans work from listings (`checkpoint_listing`: each file's size and ETag or mtime, local folders
and object stores alike) and read only what changed; a use reads everything (`verify`).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any, Protocol

from trainguard.service.db.models import Checkpoint
from trainguard.service.supervisor.ledger import Ledger
from trainguard.workers.contract import CheckpointRef, CheckpointReport

__all__ = ["CheckpointCatalog"]

log = logging.getLogger(__name__)


class _IncidentCounter(Protocol):
    def labels(self, **labels: str) -> Any: ...


class CheckpointCatalog:
    def __init__(self, ledger: Ledger, incidents_metric: _IncidentCounter) -> None:
        self.ledger = ledger
        self._incidents_metric = incidents_metric
        self._verify_lock = threading.Lock()  # the scan job and a decision may both verify
        # path -> its listing (file -> (size, ETag or mtime)) when it last verified
        self._verified: dict[str, dict[str, tuple[int, str]]] = {}

    def register(self, run_id: str, stage: str, reports: Iterable[CheckpointReport]) -> None:
        """What rank 0 reported it wrote, with the hashes that anchor every later load."""
        for rep in reports:
            self.ledger.register_checkpoint(run_id, stage, rep)
            self._verified.pop(rep.ref.path, None)  # new bytes at that path: check them again

    def pull(self, run_id: str, stage: str, group: Any) -> None:
        """Ask the live group for reports the driver's poll has not brought yet (a decision is
        about to choose a checkpoint; one written a moment ago counts)."""
        if group is None:
            return
        try:
            self.register(run_id, stage, group.checkpoint_reports())
        except Exception:  # noqa: BLE001 - a dead group reports nothing; the decision uses what is stored
            log.exception("fetching checkpoint reports of %s failed", run_id)

    def scan(self, run_ids: Iterable[str]) -> None:
        """Re-verify the registered checkpoints of these runs whose files changed on disk."""
        with self._verify_lock:
            for run_id in run_ids:
                for row in self.ledger.checkpoints(run_id):
                    if not row.bad_reason:
                        self.verify(row)

    def verify(self, row: Checkpoint, *, force: bool = False) -> bool:
        """Does `row` still hold the bytes its worker reported? Marks the row deleted or
        quarantined when it does not.

        The change signature is one listing of the folder (`checkpoint_listing`: each file's
        size and ETag or mtime; local folders and object stores alike), never the bytes. A scan
        re-reads only the recorded files whose entry changed since the last verification (and
        the manifest). A folder seen for the first time is read in full when it is local; on an
        object store only its manifest is fetched and hashed, and every recorded file must be
        listed with its recorded size (one that is not is read, which names it). `force` (right
        before a use): every recorded file is read and hashed, wherever it lives."""
        from trainguard.workers.contract import MANIFEST_NAME
        from trainguard.workers.runtime.checkpoint import (
            CheckpointCorrupt, CheckpointError, CheckpointIncomplete, checkpoint_listing, read_verified,
        )

        ref = Ledger.ref_of(row)
        try:
            listing: dict[str, tuple[int, str]] | None = checkpoint_listing(row.path)
        except OSError as e:
            if not force:  # the storage is unreachable now: no verdict either way
                log.warning("listing checkpoint %s of run %s failed: %s", row.step, row.run_id, e)
                return True
            listing = None
        names: list[str] | None = None  # None: every recorded file
        if not force and listing is not None:
            seen = self._verified.get(row.path)
            if seen == listing:
                return True
            if seen is not None:
                names = [n for n in ref.files if n != MANIFEST_NAME and listing.get(n) != seen.get(n)]
            elif "://" in row.path:
                names = [n for n in ref.files if n != MANIFEST_NAME
                         and (n not in listing or listing[n][0] != ref.files[n].get("bytes", listing[n][0]))]
        try:
            read_verified(ref, names)  # the manifest first, always: gone unless it is the recorded one
        except CheckpointCorrupt as e:
            self._quarantine(row, str(e))
            return False
        except (CheckpointError, OSError) as e:
            if not force and "://" in row.path and not isinstance(e, CheckpointIncomplete):
                # unreadable, not absent (a connection reset mid-read): no verdict in a scan
                log.warning("checkpoint %s of run %s unreadable now: %s", row.step, row.run_id, e)
                return True
            log.info("checkpoint %s of run %s is gone: %s", row.step, row.run_id, e)
            self._verified.pop(row.path, None)
            self.ledger.mark_checkpoint_gone(row)
            return False
        if listing is not None:  # taken before the read: a change during it shows at the next scan
            self._verified[row.path] = listing
        return True

    def verified_now(self, run_id: str, path: str, stage: str | None = None) -> bool:
        """Right before a use: is the checkpoint at `path` still what its worker wrote? (Unknown
        paths are not the catalog's to judge: True.)"""
        row = self.ledger.find_checkpoint(run_id, path, stage)
        if row is None:
            return True
        with self._verify_lock:
            return self.verify(row, force=True)

    def _quarantine(self, row: Checkpoint, reason: str) -> None:
        if self.ledger.quarantine_checkpoint(row, reason):
            self._incidents_metric.labels(run=row.run_id, stage=row.stage_name, kind="checkpoint_corrupt").inc()
        log.warning("checkpoint %s of run %s is bad: %s", row.id, row.run_id, reason)

    def ref_for(self, run_id: str, path: str) -> CheckpointRef | None:
        """The reference (path + recorded hashes) of one of the run's reported checkpoints."""
        row = self.ledger.find_checkpoint(run_id, path)
        return Ledger.ref_of(row) if row is not None and row.files else None

    def resume_point(self, run_id: str, stage: str) -> CheckpointRef | None:
        """The stage's newest good checkpoint that still verifies (None: start the stage afresh)."""
        for row in sorted(self.ledger.checkpoints(run_id, stage, good_only=True), key=lambda c: c.step, reverse=True):
            with self._verify_lock:
                if self.verify(row, force=True):
                    return Ledger.ref_of(row)
        return None

