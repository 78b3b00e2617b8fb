"""The watch cycle: fetch every running stage's new signals, buffer them, and hand what the
detectors find (and what Alertmanager reports) to the executor.

    MetricsSource.fetch --> ingest (records, counters, heartbeats per rank; rank 0's steps
    complete a recovery in flight, feed goodput and the live stage row) --> evaluate_stage
    (service/domain/evaluate.py) --> RecoveryExecutor.handle
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from trainguard.service.adapters.metrics import MetricsSource, Snapshot, Target
from trainguard.service.domain.evaluate import GPU_COUNTERS, WatchConfig, alert_finding, evaluate_stage
from trainguard.service.domain.series import Sample
from trainguard.service.domain.state import RunState
from trainguard.service.supervisor.executor import RecoveryExecutor
from trainguard.service.supervisor.ledger import Ledger, LiveRow, finite
from trainguard.service.supervisor.stage import ActiveStage

__all__ = ["Watch", "LIVE_EVERY_S"]

log = logging.getLogger(__name__)

LIVE_EVERY_S = 1.0
"""How often a running stage's step, loss and last-step time are written to the store."""
_NOT_WATCHED = frozenset({RunState.PAUSED, RunState.NEEDS_ATTENTION, RunState.STOPPED})

RunningStages = Callable[[], list[tuple[str, ActiveStage]]]


class Watch:
    def __init__(self, ledger: Ledger, executor: RecoveryExecutor, source: MetricsSource, config: WatchConfig,
                 running: RunningStages, *, detect: bool = True) -> None:
        self.ledger, self.executor, self.source, self.config = ledger, executor, source, config
        self.running = running  # (run id, stage) of every stage with a live worker group
        self.detect = detect  # False: buffer and show progress, never recover (settings.watch_enabled)
        self._targets: dict[int, list[Target]] = {}  # id(group) -> its targets, to forget them later
        # one cycle at a time: the scheduler's and a driver's (a group that finished) would otherwise
        # fetch the same records twice (the source's history cursors), and the second ingest of a
        # step before the one a recovery was decided at reads as "the workers went back": a
        # recovery marked done that never happened (seen once under load: the same NaN handled twice)
        self._cycle = threading.Lock()

    # ---- targets -----------------------------------------------------------------------------
    def targets_of(self, active: ActiveStage, group: Any) -> list[Target]:
        """The group's metrics endpoints (waits for its workers to come up)."""
        try:
            endpoints = group.endpoints()
        except Exception as e:  # noqa: BLE001 - a group that never came up: poll() reports it
            log.warning("no endpoints for %s/%s: %s", active.run_id, active.name, e)
            endpoints = []
        self._targets[id(group)] = targets = [
            Target(run=active.run_id, stage=active.name, rank=int(e["rank"]), host=e["host"], port=int(e["port"]))
            for e in endpoints]
        # a group re-attached after a supervisor restart: read its history from then on (what it
        # did meanwhile was watched by no one; its checkpoint reports are collected by the poll)
        start_after = getattr(self.source, "start_after", None)
        for t in targets:
            seq = getattr(group, "history_seqs", {}).get(t.rank)
            if seq is not None and start_after is not None:
                start_after(t, seq)
        return targets

    def forget(self, group: Any) -> None:
        """The group is gone: the source drops what it kept about its endpoints."""
        for t in self._targets.pop(id(group), []) if group is not None else []:
            self.source.forget(t)

    # ---- the cycle ---------------------------------------------------------------------------
    def once(self, now: float | None = None, *, run_ids: Iterable[str] | None = None) -> None:
        """Fetch every running stage's new signals; with detection on, evaluate the detectors.
        A stage marked done (its driver's own last pass saw every step) is left alone."""
        with self._cycle:
            self._once(now, run_ids)

    def _once(self, now: float | None, run_ids: Iterable[str] | None) -> None:
        wanted = None if run_ids is None else set(run_ids)
        pairs = [(r, a) for r, a in self.running() if wanted is None or r in wanted]
        targets = [t for _, a in pairs for t in a.targets]
        if not targets:
            return
        snaps = self.source.fetch(targets)
        now = time.time() if now is None else now
        live: list[tuple[ActiveStage, LiveRow]] = []
        try:
            self._watch_each(pairs, snaps, now, live)
        except BaseException:
            try:
                self._write_live(live)  # what was ingested before the failure still shows
            except Exception:  # noqa: BLE001 - the failure in flight is the one to report
                log.exception("live progress of %d stages not written", len(live))
            raise
        self._write_live(live)  # one transaction for every stage's live row

    def _watch_each(self, pairs: list[tuple[str, ActiveStage]], snaps: Mapping[Target, Snapshot], now: float,
                    live: list[tuple[ActiveStage, LiveRow]]) -> None:
        for run_id, active in pairs:
            with self.ledger.lock(run_id):
                if active.done:
                    continue
                self.ingest(active, {t: snaps[t] for t in active.targets if t in snaps})
                row = self._live_row(active)
                if row is not None:
                    live.append((active, row))
                if not self.detect:
                    continue
                # the detectors are pure: the run's state (a query) is read only when they found
                # something, still under the run's lock, before any decision
                findings = evaluate_stage(active, self.config, now=now)
                if not findings or self.ledger.run_state(run_id) in _NOT_WATCHED:
                    continue
                for finding in findings:
                    self.executor.handle(run_id, active, finding, source="watch")

    def ingest(self, active: ActiveStage, snaps: Mapping[Target, Snapshot]) -> None:
        for t, snap in snaps.items():
            if not snap.reachable:
                continue
            series = active.series(t.rank)
            for rec in snap.records:
                step = int(rec["step"])
                if series and step <= int(series[-1]["step"]):
                    # the worker went back (rollback applied): drop what it left behind
                    while series and int(series[-1]["step"]) >= step:
                        series.pop()
                    active.went_back(step - 1)
                if active.group_first_step is None:
                    active.group_first_step = step
                series.append(rec)
                if t.rank == 0:
                    self._observe_step(active, rec)
            self._counters(active, t.rank, snap, series)
            if snap.last_step_time is not None:
                active.heartbeat[t.rank] = snap.last_step_time
            if snap.busy_seconds is not None and snap.read_at is not None:
                active.observe_busy(t.rank, snap.last_step_time, snap.read_at, snap.busy_seconds,
                                    self.config.hang.idle_fraction)
            (active.paused_ranks.add if snap.paused else active.paused_ranks.discard)(t.rank)

    @staticmethod
    def _counters(active: ActiveStage, rank: int, snap: Snapshot, series: Any) -> None:
        """Each counter's values, by the last step each was seen at. A GPU error counter
        counts from its worker's start (the workers' contract), so its history starts at 0 at
        the group's first step: a rise the first scrape already shows is still a rise."""
        at = snap.step if snap.step is not None else (int(series[-1]["step"]) if series else 0)
        for key, v in snap.counters.items():
            changes = active.counter_series.setdefault((rank, key), [])
            if not changes and key in GPU_COUNTERS:
                start = active.group_first_step if active.group_first_step is not None else at
                changes.append(Sample(max(start - 1, 0), 0.0))
            if changes and changes[-1].value == v:
                changes[-1] = Sample(int(at), float(v))  # still this value at `at`: a rise is dated after it
            else:
                changes.append(Sample(int(at), float(v)))

    def _observe_step(self, active: ActiveStage, rec: dict[str, Any]) -> None:
        """Rank 0's step: progress, productive time, and whether a recovery in flight took effect."""
        step = int(rec["step"])
        loss = rec.get("loss")
        if loss is not None and finite(loss):
            if active.first_loss is None:
                active.first_loss = float(loss)
                self.ledger.update_stage(active.run_id, active.name, first_loss=float(loss))
            active.last_loss = float(loss)
        if active.step_seconds and step <= max(active.step_seconds):  # replayed after a rollback/restart
            for k in [k for k in active.step_seconds if k >= step]:
                del active.step_seconds[k]
        if rec.get("step_seconds") is not None:
            active.step_seconds[step] = float(rec["step_seconds"])
        active.last_step = step
        at = rec.get("time")
        active.last_step_time = float(at) if at is not None else time.time()
        active.batch_cursor = int(rec.get("batch_index", step))
        if active.pending is not None and active.pending.taken_effect(step):
            self.executor.recovered(active, step=step, at=active.last_step_time)

    @staticmethod
    def _live_row(active: ActiveStage) -> LiveRow | None:
        """The running stage's step, loss and last-step time, for GET /runs/{id}, when due (throttled)."""
        step, when = active.live_written
        if active.last_step < 0 or active.last_step == step or time.time() - when < LIVE_EVERY_S:
            return None
        at = datetime.fromtimestamp(active.last_step_time, timezone.utc) if active.last_step_time else None
        return LiveRow(run_id=active.run_id, stage=active.name, step=active.last_step, last_loss=active.last_loss,
                       last_step_at=at)

    def _write_live(self, live: list[tuple[ActiveStage, LiveRow]]) -> None:
        """The cycle's live rows, in one transaction (the watch cycle holds `_cycle`: a driver's
        last write to its stage row, after its own cycle, comes after this one)."""
        if not live:
            return
        self.ledger.update_stages_live([row for _, row in live])
        written = time.time()
        for active, row in live:
            active.live_written = (row.step, written)

    # ---- alerts ------------------------------------------------------------------------------
    def alerts(self, payload: Any, stage_of: Callable[[str], ActiveStage | None], *, actor: str) -> dict[str, int]:
        """Alertmanager's webhook: a firing alert for a running stage is a finding (its onset
        located in the buffers); a resolved one closes the open alert incidents it raised."""
        counts = {"created": 0, "merged": 0, "resolved": 0, "ignored": 0}
        for alert in payload.alerts:
            labels = dict(alert.labels)
            run_id, kind = labels.get("run"), labels.get("trainguard_kind")
            fingerprint = alert.fingerprint or json.dumps(labels, sort_keys=True)
            if alert.status == "resolved":
                counts["resolved"] += self.ledger.resolve_alert(run_id, fingerprint) if run_id else 0
                continue
            active = stage_of(run_id) if run_id else None
            if active is None or kind is None or (labels.get("stage") and labels["stage"] != active.name):
                counts["ignored"] += 1
                continue
            assert run_id is not None
            with self.ledger.lock(run_id):
                finding = alert_finding(active, kind, labels, self.config)
                if finding is None:
                    counts["ignored"] += 1
                    continue
                res = self.executor.handle(run_id, active, finding, source="alert", fingerprint=fingerprint,
                                           actor=actor)
            counts["created" if res.created else "merged"] += 1
        return counts
