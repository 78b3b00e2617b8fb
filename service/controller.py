"""The controller: run drivers, the watch cycle, and the executor of recovery decisions.

Threads:
- one `RunDriver` thread per active run walks the pipeline's stages, owns the
  stage's `WorkerGroup` (start, restart, shutdown) and notices dead workers;
- the scheduler's jobs call `watch_once` (fetch signals, evaluate detectors),
  `checkpoints_once` (re-verify registered checkpoints against their recorded hashes) and
  `goodput_once`; the driver registers the checkpoints its workers report as it polls them;
- API threads call the control methods.
Every decision about a run happens under that run's lock, so the same problem
reported twice (watch and alert, or two alerts) leads to one recovery.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainguard.service import errors
from trainguard.service.adapters.metrics import DirectScrapeSource, MetricsSource, PrometheusSource, Target
from trainguard.service.db import crud
from trainguard.service.telemetry import SupervisorMetrics
from trainguard.service.domain.policy import dedup_key
from trainguard.service.watch import WatchConfig, alert_finding, evaluate_stage, recovery_decision
from trainguard.workers.contract import CheckpointRef, CheckpointReport, ControlKind
from trainguard.workers.spec import PipelineSpec, parse_pipeline

log = logging.getLogger(__name__)

ACTIVE_STATES = ("pending", "running", "paused", "recovering")
STOP_GRACE_S = 30.0  # how long a stopped group may take to write its last checkpoint before it is killed
LIVE_EVERY_S = 1.0  # how often a running stage's step, loss and last-step time are written to the store
SPIKE_FAMILY = ("loss_spike", "divergence", "nan", "grad_explosion", "reward_hacking")
BUFFER_STEPS = 400


@dataclass
class ActiveStage:
    """In-memory view of the stage a run is executing now."""

    run_id: str
    name: str
    kind: str
    index: int
    steps: int
    group: Any = None  # workers.group.WorkerGroup
    started_at: float = field(default_factory=time.time)
    records: dict[int, deque] = field(default_factory=dict)  # rank -> deque of per-step records
    counters: dict[tuple[int, str], float] = field(default_factory=dict)
    counter_base: dict[tuple[int, str], float] = field(default_factory=dict)
    heartbeat: dict[int, float] = field(default_factory=dict)
    paused_ranks: set[int] = field(default_factory=set)
    last_step: int = -1
    first_loss: float | None = None
    last_loss: float | None = None
    pending: dict | None = None  # recovery in flight: {"incident", "kind", "target_step", "detected_at"}
    useful: dict[int, float] = field(default_factory=dict)  # step -> seconds (rank 0), for goodput
    targets: list[Target] = field(default_factory=list)
    batch_cursor: int = 0
    after: dict[str, int] = field(default_factory=dict)  # kind -> step of the last handled episode
    last_step_time: float | None = None  # unix time rank 0 finished `last_step`
    resumed_at: float = 0.0  # unix time of the last operator resume: hang clocks start again there
    live_written: tuple[int, float] = (-1, 0.0)  # (step, when) last written to the stage row
    done: bool = False  # the stage completed: the watch has seen its last step and leaves it

    def reset_episodes(self) -> None:
        """The workers went back (rollback/restart): old episodes are gone from the buffers."""
        self.after.clear()

    def series(self, rank: int) -> deque:
        return self.records.setdefault(rank, deque(maxlen=BUFFER_STEPS))


class RunDriver(threading.Thread):
    """Walks one run's stages; owns the worker group of the current stage."""

    def __init__(self, ctl: "Controller", run_id: str, spec: PipelineSpec, *, start_paused: bool = False) -> None:
        super().__init__(name=f"driver-{run_id}", daemon=True)
        self.ctl = ctl
        self.run_id = run_id
        self.spec = spec
        self.commands: queue.Queue = queue.Queue()
        self.active: ActiveStage | None = None
        self.lock = threading.RLock()
        self.start_paused = start_paused
        self._halt = threading.Event()
        self._stop_deadline: float | None = None  # set by stop(): wait for the workers' stop, then end

    # ---- requests from other threads -------------------------------------------------------
    def request_restart(self, *, checkpoint: str | None, incident_id: int | None) -> None:
        self.commands.put(("restart", {"checkpoint": checkpoint, "incident": incident_id}))

    def halt(self) -> None:
        self._halt.set()
        self.commands.put(("halt", {}))

    def request_stop(self) -> None:
        """The run was stopped: let the workers write their stop checkpoint (they got the STOP
        control), then end the stage; kill the group if that takes longer than STOP_GRACE_S."""
        self._stop_deadline = time.monotonic() + STOP_GRACE_S
        self.commands.put(("stop", {}))

    # ---- thread body -------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run_stages()
        except Exception as e:  # noqa: BLE001 - a driver failure must mark the run, not vanish
            log.exception("run %s failed", self.run_id)
            self.ctl._set_state(self.run_id, "failed", actor="supervisor", reason=f"driver error: {e}")
        finally:
            self._shutdown_group()
            self.ctl._close_stages(self.run_id)
            self.ctl._driver_done(self.run_id)

    def _run_stages(self) -> None:
        ctl = self.ctl
        while not self._halt.is_set():
            with ctl.session() as s:
                run = crud.get_run(s, run_id=self.run_id)
                stages = crud.list_stages(s, run_id=self.run_id)
                if run.state in ("stopped", "failed", "completed", "needs_attention"):
                    return
                todo = [st for st in stages if st.state != "completed"]
                outputs = {st.name: st.output_checkpoint for st in stages if st.output_checkpoint}
            if not todo:
                ctl._run_ended[self.run_id] = time.time()
                ctl.goodput_once(run_ids=[self.run_id])
                ctl._set_state(self.run_id, "completed", actor="supervisor", reason="all stages completed")
                return
            st = todo[0]
            done = self._run_stage(st.name, st.kind, st.index, st.steps, outputs)
            if not done:
                return

    def _new_group(self, stage_spec: Any, outputs: dict[str, str], resume_from: CheckpointRef | None) -> Any:
        """The earlier stages' outputs go to the workers with the hashes recorded when they were
        reported; an output the store has no hashes for is not handed over."""
        from trainguard.workers.group import WorkerGroup

        skip, lr_mult = self.ctl._accumulated_recovery(self.run_id, stage_spec.name)
        inputs = {name: ref for name, path in outputs.items()
                  if (ref := self.ctl._ref_for(self.run_id, path)) is not None}
        group = WorkerGroup(
            run_id=self.run_id, spec=self.spec, stage_name=stage_spec.name, state_dir=self.ctl.state_dir,
            resume_from=resume_from, skip=skip, lr_multiplier=lr_mult,
            inputs=inputs, fired_dir=self.ctl.state_dir / "runs" / self.run_id / "faults",
        )
        group.start()
        return group

    def _run_stage(self, name: str, kind: str, index: int, steps: int, outputs: dict[str, str]) -> bool:
        ctl = self.ctl
        stage_spec = self.spec.stage(name)
        active = ActiveStage(run_id=self.run_id, name=name, kind=kind, index=index, steps=steps)
        resume = ctl._resume_checkpoint(self.run_id, name)
        with ctl.session() as s:
            crud.update_stage(s, run_id=self.run_id, name=name, state="running", started_at=ctl.now_dt())
            crud.update_run(s, run=crud.get_run(s, run_id=self.run_id), current_stage=name)
        group = self._new_group(stage_spec, outputs, resume)
        targets = ctl._targets_of(active, group)  # waits for the workers: not under the lock
        with self.lock:
            active.group, active.targets = group, targets
            self.active = active
        with ctl.session() as s:
            run = crud.get_run(s, run_id=self.run_id)
            state = run.state
        if state == "pending":
            ctl._set_state(self.run_id, "running", actor="supervisor", reason=f"stage {name} started")
        if self.start_paused or state == "paused":
            self.start_paused = False
            active.group.control(ControlKind.PAUSE, {})
        ctl._event(self.run_id, "supervisor", "stage_started",
                   {"stage": name, "resume_from": resume.path if resume else None}, "ok")
        while not self._halt.is_set():
            try:
                cmd, arg = self.commands.get(timeout=0.2)
            except queue.Empty:
                cmd, arg = None, None
            if cmd == "halt":
                return False
            if cmd == "restart" and self._stop_deadline is None:
                self._restart(stage_spec, outputs, arg)
                continue
            status = self._poll()
            if status is None:
                if self._stop_deadline is not None:
                    return False  # stopped while no group runs (a restart was under way)
                continue
            ctl._register_reports(self.run_id, name, status.get("checkpoints", []))
            state = status["state"]
            if self._stop_deadline is not None:
                if state in ("stopped", "finished", "failed") or time.monotonic() > self._stop_deadline:
                    return False
                continue
            if state == "finished":
                # the stage is done only once the watch has seen its last steps: a problem in
                # them is handled (a rollback the loop ended too soon to apply restarts it)
                ctl.watch_once(run_ids=[self.run_id])
                with ctl.lock(self.run_id):
                    restart = self._rollback_missed(active, status)
                    active.done = restart is None
                if restart is not None:
                    self._restart(stage_spec, outputs, restart)
                    continue
                self._finish_stage(active, status)
                return True
            if state == "stopped":
                ctl._set_state(self.run_id, "stopped", actor="supervisor", reason=f"stage {name} stopped")
                return False
            if state == "failed":
                ctl._worker_lost(self.run_id, active, status)
        return False

    def _rollback_missed(self, active: ActiveStage, status: dict) -> dict | None:
        """Called under the run's lock when the group finished with a rollback in flight.
        Applied (the workers report its incident): it is recovered, whether or not its steps
        were scraped. Not applied (the loop ended before its next boundary): the stage's output
        holds what the rollback was to undo, so the stage is not done; returns the restart to
        carry out from the rollback's checkpoint (the incident's skip and LR multiplier go to
        the new group)."""
        pend = active.pending
        if pend is None or pend.get("restart"):
            return None
        if pend["incident"] in status.get("rollbacks_applied", []):
            self.ctl._recovered(active, {"step": active.last_step, "time": time.time()})
            return None
        pend["restart"] = True
        log.warning("run %s: stage %s finished before its rollback (incident %s) applied; restarting from %s",
                    self.run_id, active.name, pend["incident"], pend.get("checkpoint"))
        return {"checkpoint": pend.get("checkpoint"), "incident": pend["incident"]}

    def _poll(self) -> dict | None:
        with self.lock:
            group = self.active.group if self.active else None
        if group is None:
            return None
        try:
            return group.poll()
        except Exception as e:  # noqa: BLE001 - Ray errors while polling are worker loss
            log.warning("poll of %s failed: %s", self.run_id, e)
            return {"state": "failed", "error": str(e), "failed_rank": None, "ranks": []}

    def _restart(self, stage_spec: Any, outputs: dict[str, str], arg: dict) -> None:
        ctl = self.ctl
        with self.lock:
            active = self.active
            assert active is not None
            old = active.group
            active.group, active.targets = None, []
        if old is not None:
            try:
                old.shutdown()
            except Exception:  # noqa: BLE001
                log.exception("shutdown of old group failed")
        for t in ctl.source_targets_of(old):
            ctl.source.forget(t)
        checkpoint = arg.get("checkpoint")
        group = self._new_group(stage_spec, outputs, ctl._ref_for(self.run_id, checkpoint) if checkpoint else None)
        targets = ctl._targets_of(active, group)
        with self.lock:
            active.group, active.targets = group, targets
            if self._halt.is_set() or self._stop_deadline is not None:
                # stopped while the new group was coming up: it ends with the run (the driver's
                # finally kills it), it does not train
                self._halt.set()
                return
            active.records.clear()
            active.heartbeat.clear()
            active.counters.clear()
            active.counter_base.clear()
            active.reset_episodes()
            active.started_at = time.time()
            if active.pending is not None:
                active.pending["armed"] = True
        ctl._event(self.run_id, "supervisor", "group_restarted", {"stage": active.name, "checkpoint": checkpoint}, "ok")

    def _finish_stage(self, active: ActiveStage, status: dict) -> None:
        ctl = self.ctl
        ctl.checkpoints_once(run_ids=[self.run_id])  # what retention deleted in the last seconds
        ctl._useful_done[self.run_id] = ctl._useful_done.get(self.run_id, 0.0) + sum(active.useful.values())
        with ctl.session() as s:
            crud.update_stage(
                s, run_id=self.run_id, name=active.name, state="completed", finished_at=ctl.now_dt(),
                output_checkpoint=status.get("output_checkpoint"), step=active.steps,
                final_loss=active.last_loss, last_loss=active.last_loss,
            )
        ctl._event(self.run_id, "supervisor", "stage_completed",
                   {"stage": active.name, "output_checkpoint": status.get("output_checkpoint")}, "ok")
        self._shutdown_group()

    def _shutdown_group(self) -> None:
        with self.lock:
            active = self.active
            self.active = None
        if active is not None and active.group is not None:
            try:
                active.group.shutdown()
            except Exception:  # noqa: BLE001
                log.exception("group shutdown failed")
            for t in self.ctl.source_targets_of(active.group):
                self.ctl.source.forget(t)


class Controller:
    """Owns the store connection, the run drivers and the recovery executor."""

    def __init__(self, settings: Any, *, engine: Any = None, source: MetricsSource | None = None,
                 watch_config: WatchConfig | None = None, metrics: SupervisorMetrics | None = None) -> None:
        from trainguard.service.db import make_engine, init_db

        self.settings = settings
        self.state_dir = Path(settings.state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.engine = engine or make_engine(settings.resolved_database_url())
        init_db(self.engine)
        self.source: MetricsSource = source or (
            PrometheusSource(settings.prometheus_url) if settings.prometheus_url else DirectScrapeSource()
        )
        self.watch_config = watch_config or WatchConfig.from_settings(settings)
        self.metrics = metrics or SupervisorMetrics()
        self.drivers: dict[str, RunDriver] = {}
        self._locks: dict[str, threading.RLock] = {}
        self._glock = threading.Lock()
        self._ckpt_lock = threading.Lock()
        self._target_cache: dict[int, list[Target]] = {}  # id(group) -> its targets, to forget them later
        self._verified: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) at verification
        self._paused_since: dict[str, float] = {}
        self._paused_total: dict[str, float] = {}
        self._useful_done: dict[str, float] = {}  # run -> productive seconds of its finished stages
        self._run_started: dict[str, float] = {}
        self._run_ended: dict[str, float] = {}
        self._started = False

    # ---- lifecycle --------------------------------------------------------------------------
    def session(self):
        from sqlmodel import Session

        return Session(self.engine, expire_on_commit=False)

    @staticmethod
    def now_dt():
        from datetime import datetime, timezone

        return datetime.now(timezone.utc)

    def start(self) -> None:
        """Connect to Ray and pick up every run that was active when the supervisor last stopped."""
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                     log_to_driver=False, configure_logging=False, ignore_reinit_error=True)
        from trainguard.workers.group import warm_pool

        warm_pool().refill()  # spare workers import torch now, not when the first stage starts
        self._started = True
        with self.session() as s:
            runs = [r for r in crud.list_runs(s, limit=100_000, offset=0) if r.state in ACTIVE_STATES]
        for run in runs:
            self._adopt(run)

    def _adopt(self, run: Any) -> None:
        """A run that was active under a previous supervisor process: its workers are gone with it.
        Close what was in flight (the restart below carries out those decisions: skip list and LR
        come from the recorded incidents) and restart the current stage from its newest good checkpoint."""
        with self.session() as s:
            for inc in crud.list_incidents(s, run_id=run.id, open_only=True):
                crud.update_incident(s, incident=inc, outcome="resolved", resolved_at=self.now_dt(),
                                     action=inc.action or "restart")
            crud.add_event(s, run_id=run.id, actor="supervisor", kind="adopted",
                           detail={"state": run.state}, result="restarting current stage from newest good checkpoint")
        paused = run.state == "paused"
        if run.state == "recovering":
            self._set_state(run.id, "running", actor="supervisor", reason="supervisor restarted")
        self._spawn(run.id, parse_pipeline(json.loads(run.spec)), start_paused=paused)

    def shutdown(self) -> None:
        for d in list(self.drivers.values()):
            d.halt()
        for d in list(self.drivers.values()):
            d.join(timeout=30)
        self.source.close()

    def ready(self) -> bool:
        return self._started

    def _spawn(self, run_id: str, spec: PipelineSpec, *, start_paused: bool = False) -> None:
        self._run_started.setdefault(run_id, time.time())
        self._run_ended.pop(run_id, None)
        d = RunDriver(self, run_id, spec, start_paused=start_paused)
        with self._glock:
            self.drivers[run_id] = d
        d.start()

    def _driver_done(self, run_id: str) -> None:
        with self._glock:
            self.drivers.pop(run_id, None)

    def lock(self, run_id: str) -> threading.RLock:
        with self._glock:
            return self._locks.setdefault(run_id, threading.RLock())

    # ---- store helpers ----------------------------------------------------------------------
    def _event(self, run_id: str, actor: str, kind: str, detail: dict, result: str) -> None:
        with self.session() as s:
            crud.add_event(s, run_id=run_id, actor=actor, kind=kind, detail=detail, result=result)

    def _set_state(self, run_id: str, state: str, *, actor: str, reason: str) -> None:
        from trainguard.service.domain.state import RunState, transition_to

        with self.lock(run_id), self.session() as s:
            run = crud.get_run(s, run_id=run_id)
            if run.state == state:
                return
            transition_to(RunState(run.state), RunState(state))  # raises on an illegal move
            crud.set_run_state(s, run=run, state=state, actor=actor, reason=reason)
        now = time.time()
        if state == "paused":  # an operator's pause is not lost work; needs_attention is
            self._paused_since.setdefault(run_id, now)
        elif run_id in self._paused_since:
            self._paused_total[run_id] = self._paused_total.get(run_id, 0.0) + now - self._paused_since.pop(run_id)
        self.metrics.set_state(run_id, state)

    def _get_run(self, run_id: str) -> Any:
        with self.session() as s:
            run = crud.get_run(s, run_id=run_id)
        if run is None:
            raise errors.NotFound(f"run {run_id!r} not found")
        return run

    def _accumulated_recovery(self, run_id: str, stage: str) -> tuple[list[tuple[int, int]], float]:
        """Skip list and LR multiplier a (re)started group must apply: derived from the incidents."""
        with self.session() as s:
            incs = [i for i in crud.list_incidents(s, run_id=run_id) if i.stage_name == stage]
        skip: list[tuple[int, int]] = []
        lr = 1.0
        for inc in sorted(incs, key=lambda i: i.id):
            if inc.action == "rollback":
                skip.extend((int(a), int(b)) for a, b in (inc.skip or []))
                if inc.lr_multiplier is not None:
                    lr = float(inc.lr_multiplier)
        return skip, lr

    def _good_checkpoints(self, run_id: str, stage: str) -> list[Any]:
        with self.session() as s:
            return [c for c in crud.list_checkpoints(s, run_id=run_id, stage_name=stage, good_only=True) if c.files]

    def _resume_checkpoint(self, run_id: str, stage: str) -> CheckpointRef | None:
        """Newest good checkpoint of the stage that still verifies, else None (start the stage afresh)."""
        for c in sorted(self._good_checkpoints(run_id, stage), key=lambda c: c.step, reverse=True):
            if self._recheck(c, force=True):
                return CheckpointRef(c.path, dict(c.files))
        return None

    def _ref_for(self, run_id: str, path: str) -> CheckpointRef | None:
        """The reference (path + recorded hashes) of one of the run's reported checkpoints."""
        with self.session() as s:
            row = crud.find_checkpoint(s, run_id=run_id, path=path)
        return CheckpointRef(row.path, dict(row.files)) if row is not None and row.files else None

    # ---- checkpoints ------------------------------------------------------------------------
    def _register_reports(self, run_id: str, stage: str, reports: list[CheckpointReport]) -> None:
        """What rank 0 reported it wrote: the only checkpoints the supervisor ever registers, with
        the hashes it reported as the trust anchor for every later load."""
        for rep in reports:
            with self.session() as s:
                crud.upsert_checkpoint(
                    s, run_id=run_id, stage_name=stage, step=rep.step, batch_cursor=rep.batch_cursor,
                    path=rep.ref.path, verified=True, healthy=rep.healthy, metrics=dict(rep.metrics),
                    tags=list(rep.tags), files=rep.ref.to_dict()["files"])
            self._verified.pop(rep.ref.path, None)  # new bytes at that path: check them again

    def _pull_reports(self, run_id: str, active: ActiveStage) -> None:
        group = active.group
        if group is None:
            return
        try:
            self._register_reports(run_id, active.name, group.checkpoint_reports())
        except Exception:  # noqa: BLE001 - a dead group reports nothing; the decision uses what is stored
            log.exception("fetching checkpoint reports of %s failed", run_id)

    def checkpoints_once(self, run_ids: list[str] | None = None) -> None:
        """Re-verify the registered checkpoints of active runs whose files changed on disk against
        their recorded hashes; mark the ones retention or a rollback deleted."""
        with self._glock:
            drivers = [d for d in self.drivers.values() if run_ids is None or d.run_id in run_ids]
        with self._ckpt_lock:  # the scan job and a decision may both scan
            for d in drivers:
                with self.session() as s:
                    rows = [c for c in crud.list_checkpoints(s, run_id=d.run_id, include_deleted=False)
                            if not c.bad_reason and c.files]
                for row in rows:
                    self._recheck(row)

    def _recheck(self, row: Any, *, force: bool = False) -> bool:
        """Does the registered checkpoint `row` still hold the bytes its worker reported?
        No manifest, or another checkpoint's manifest, means it is gone (retention, a rollback,
        a step rewritten): marked deleted, never corrupt. Only bytes that differ under the
        recorded manifest are corruption. Local folders are re-read only when their size or
        mtime changed; an object store's are fetched and hashed only right before a use
        (`force`: always re-read)."""
        from trainguard.workers.runtime.checkpoint import CheckpointCorrupt, CheckpointError, verify_checkpoint

        remote = "://" in row.path
        sig = None if remote else _stat_sig(row.path)
        if not force and (remote or (sig is not None and self._verified.get(row.path) == sig)):
            return True
        try:
            verify_checkpoint(CheckpointRef(row.path, dict(row.files)))
        except CheckpointCorrupt as e:
            self._checkpoint_bad(row.run_id, row.stage_name, row.id, str(e), files=row.files)
            return False
        except (CheckpointError, OSError) as e:
            log.info("checkpoint %s of run %s is gone: %s", row.step, row.run_id, e)
            self._checkpoint_gone(row)
            return False
        if sig is not None:
            self._verified[row.path] = sig
        return True

    def _checkpoint_gone(self, ckpt: Any) -> None:
        self._verified.pop(ckpt.path, None)
        with self.session() as s:
            row = crud.get_checkpoint(s, run_id=ckpt.run_id, checkpoint_id=ckpt.id)
            # unless a new report replaced the recorded files meanwhile (same step rewritten)
            if row is not None and row.files == ckpt.files:
                crud.mark_checkpoint_deleted(s, checkpoint=row)

    def _checkpoint_bad(self, run_id: str, stage: str, ckpt_id: int, reason: str, *,
                        files: dict | None = None) -> None:
        """Quarantine a corrupt checkpoint with an incident (once: the dedup key decides).

        Takes no run lock: it is called under `_ckpt_lock`, which a decision takes while it
        holds the run lock; taking them in the other order here deadlocked a run whose
        checkpoint went bad just as a spike was being handled."""
        with self.session() as s:
            ckpt = crud.get_checkpoint(s, run_id=run_id, checkpoint_id=ckpt_id)
            if ckpt is None or ckpt.bad_reason or (files is not None and ckpt.files != files):
                return
            crud.mark_checkpoint_bad(s, checkpoint=ckpt, reason=reason)
            inc, created = crud.create_incident(
                s, run_id=run_id, stage_name=stage, kind="checkpoint_corrupt", onset_step=ckpt.step,
                detected_at_step=ckpt.step, source="watch", evidence={"path": ckpt.path, "error": reason},
                dedup_key=f"{run_id}:{stage}:checkpoint_corrupt:{ckpt.id}",
            )
            if created:
                crud.update_incident(s, incident=inc, action="quarantine", outcome="resolved",
                                     resolved_at=self.now_dt(), recovery_seconds=0.0)
                self.metrics.incidents.labels(run=run_id, stage=stage, kind="checkpoint_corrupt").inc()
        log.warning("checkpoint %s of run %s is bad: %s", ckpt_id, run_id, reason)

    # ---- the watch --------------------------------------------------------------------------
    def _targets_of(self, active: ActiveStage, group: Any) -> list[Target]:
        """The group's metrics endpoints (waits for its workers to come up)."""
        try:
            eps = group.endpoints()
        except Exception as e:  # noqa: BLE001 - a group that never came up: poll() reports it
            log.warning("no endpoints for %s/%s: %s", active.run_id, active.name, e)
            eps = []
        self._target_cache[id(group)] = targets = [
            Target(run=active.run_id, stage=active.name, rank=int(e["rank"]), host=e["host"], port=int(e["port"]))
            for e in eps]
        return targets

    def source_targets_of(self, group: Any) -> list[Target]:
        return self._target_cache.pop(id(group), []) if group is not None else []

    def active_stages(self) -> list[tuple[RunDriver, ActiveStage]]:
        with self._glock:
            drivers = list(self.drivers.values())
        out = []
        for d in drivers:
            with d.lock:
                if d.active is not None and d.active.group is not None:
                    out.append((d, d.active))
        return out

    def watch_once(self, now: float | None = None, *, run_ids: list[str] | None = None) -> None:
        """Fetch every active worker's new signals; with the watch enabled, evaluate the detectors.
        A stage marked done (its driver's own last pass saw every step) is not evaluated again."""
        pairs = [(d, a) for d, a in self.active_stages() if run_ids is None or d.run_id in run_ids]
        targets = [t for _, a in pairs for t in a.targets]
        if not targets:
            return
        snaps = self.source.fetch(targets)
        now = time.time() if now is None else now
        for driver, active in pairs:
            with self.lock(driver.run_id):
                if active.done:
                    continue
                self._ingest(active, {t: snaps[t] for t in active.targets if t in snaps})
                self._write_live(active)
                if not self.settings.watch_enabled:
                    continue
                if self._run_state(driver.run_id) in ("paused", "needs_attention", "stopped"):
                    continue
                for finding in evaluate_stage(active, self.watch_config, now=now):
                    self.handle_finding(driver.run_id, active, finding, source="watch")

    def _write_live(self, active: ActiveStage) -> None:
        """The running stage's step, loss and last-step time, for GET /runs/{id} (throttled)."""
        step, when = active.live_written
        if active.last_step < 0 or active.last_step == step or time.time() - when < LIVE_EVERY_S:
            return
        from datetime import datetime, timezone

        at = datetime.fromtimestamp(active.last_step_time, timezone.utc) if active.last_step_time else None
        with self.session() as s:
            crud.update_stage(s, run_id=active.run_id, name=active.name, step=active.last_step,
                              last_loss=active.last_loss, last_step_at=at)
        active.live_written = (active.last_step, time.time())

    def _run_state(self, run_id: str) -> str:
        with self.session() as s:
            return crud.get_run(s, run_id=run_id).state

    def _ingest(self, active: ActiveStage, snaps: dict[Target, Any]) -> None:
        for t, snap in snaps.items():
            if not snap.reachable:
                continue
            for key, v in snap.counters.items():
                active.counters[(t.rank, key)] = v
                active.counter_base.setdefault((t.rank, key), v)
            if snap.last_step_time is not None:
                active.heartbeat[t.rank] = snap.last_step_time
            (active.paused_ranks.add if snap.paused else active.paused_ranks.discard)(t.rank)
            series = active.series(t.rank)
            for rec in snap.records:
                step = int(rec["step"])
                if series and step <= int(series[-1]["step"]):
                    # the worker went back (rollback applied): drop what it left behind
                    while series and int(series[-1]["step"]) >= step:
                        series.pop()
                    active.reset_episodes()
                series.append(rec)
                if t.rank == 0:
                    self._observe_step(active, rec)

    def _observe_step(self, active: ActiveStage, rec: dict) -> None:
        step = int(rec["step"])
        loss = rec.get("loss")
        if loss is not None and active.first_loss is None and _finite(loss):
            active.first_loss = float(loss)
            with self.session() as s:
                crud.update_stage(s, run_id=active.run_id, name=active.name, first_loss=float(loss))
        if loss is not None and _finite(loss):
            active.last_loss = float(loss)
        if active.useful and step <= max(active.useful):  # replayed after a rollback/restart
            for k in [k for k in active.useful if k >= step]:
                del active.useful[k]
        if rec.get("step_seconds") is not None:
            active.useful[step] = float(rec["step_seconds"])
        active.last_step = step
        active.last_step_time = float(rec["time"]) if rec.get("time") is not None else time.time()
        active.batch_cursor = int(rec.get("batch_index", step))
        pend = active.pending
        if pend is not None:
            if pend.get("restart"):
                if pend.get("armed"):  # first step of the new group
                    self._recovered(active, rec)
            elif pend.get("target_step") is None or step <= pend["target_step"] + 1 or step < pend["from_step"]:
                # first step seen after the rollback was applied (a scrape-based source may not
                # see target+1 itself, only that the step went back)
                self._recovered(active, rec)

    def _recovered(self, active: ActiveStage, rec: dict) -> None:
        pend = active.pending
        active.pending = None
        if pend is None:
            return
        secs = max(0.0, float(rec.get("time", time.time())) - pend["detected_at"])
        with self.session() as s:
            inc = crud.get_incident(s, incident_id=pend["incident"])
            if inc is not None and inc.outcome == "recovering":
                crud.update_incident(s, incident=inc, outcome="resolved", recovery_seconds=secs,
                                     resolved_at=self.now_dt())
        self.metrics.recovery_seconds.labels(kind=pend["kind"]).observe(secs)
        if self._run_state(active.run_id) == "recovering":
            self._set_state(active.run_id, "running", actor="supervisor", reason=f"recovered from {pend['kind']}")
        self._event(active.run_id, "supervisor", "recovered",
                    {"incident": pend["incident"], "step": rec.get("step"), "seconds": round(secs, 3)}, "ok")

    # ---- incidents and recovery -------------------------------------------------------------
    def _generation(self, run_id: str, stage: str) -> int:
        with self.session() as s:
            return sum(1 for i in crud.list_incidents(s, run_id=run_id)
                       if i.stage_name == stage and i.action in ("rollback", "restart"))

    def handle_finding(self, run_id: str, active: ActiveStage, finding: dict, *, source: str,
                       fingerprint: str | None = None, actor: str = "supervisor") -> dict:
        """Record the incident (de-duplicated) and carry out the policy's decision once."""
        kind = finding["kind"]
        with self.lock(run_id):
            if self._run_state(run_id) in ("stopped", "failed", "completed"):
                return {"incident": None, "created": False, "ignored": "run has ended"}
            if active.pending is not None and (kind in SPIKE_FAMILY or kind == active.pending["kind"]):
                # a recovery is already in flight for this stage: this is the same problem seen again
                return self._merge_into(active.pending["incident"], fingerprint, source)
            active.after[kind] = int(finding.get("detected_at_step", finding["onset_step"]))
            gen = self._generation(run_id, active.name)
            with self.session() as s:
                open_same = [i for i in crud.list_incidents(s, run_id=run_id, open_only=True)
                             if i.stage_name == active.name and i.kind == kind]
            if open_same:
                return self._merge_into(open_same[0].id, fingerprint, source)
            key = dedup_key(run_id, active.name, kind, int(finding["onset_step"]), generation=gen)
            if source == "operator":
                key += f"/op{time.time_ns()}"  # every operator request is its own incident
            with self.session() as s:
                inc, created = crud.create_incident(
                    s, run_id=run_id, stage_name=active.name, kind=kind, onset_step=int(finding["onset_step"]),
                    detected_at_step=int(finding.get("detected_at_step", finding["onset_step"])), source=source,
                    evidence=_jsonable(finding.get("evidence", {})), dedup_key=key,
                    alert_fingerprints=[fingerprint] if fingerprint else [],
                )
            if not created:
                return self._merge_into(inc.id, fingerprint, source)
            self.metrics.incidents.labels(run=run_id, stage=active.name, kind=kind).inc()
            log.warning("incident %s: %s in %s/%s at step %s (%s)", inc.id, kind, run_id, active.name,
                        finding["onset_step"], source)
            decision = self._decide_with_valid_checkpoint(run_id, active, inc)
            self._execute(run_id, active, inc.id, kind, decision, actor=actor)
            return {"incident": inc.id, "created": True, "action": decision["action"]}

    def _decide_with_valid_checkpoint(self, run_id: str, active: ActiveStage, inc: Any) -> dict:
        """The policy's decision, re-taken while its checkpoint fails verification right before use
        (a corrupted checkpoint is quarantined and the next older one considered)."""
        self._pull_reports(run_id, active)  # the driver's poll may lag behind fast steps
        self.checkpoints_once(run_ids=[run_id])
        for _ in range(10):
            decision = recovery_decision(self, run_id, active, inc, self.watch_config)
            path = decision.get("checkpoint")
            if path is None or decision["action"] not in ("rollback", "restart"):
                return decision
            with self.session() as s:
                row = crud.find_checkpoint(s, run_id=run_id, path=path, stage_name=active.name)
            if row is None or self._recheck(row, force=True):
                return decision
        return decision

    def _merge_into(self, incident_id: int, fingerprint: str | None, source: str) -> dict:
        with self.session() as s:
            inc = crud.get_incident(s, incident_id=incident_id)
            if inc is not None and fingerprint and fingerprint not in (inc.alert_fingerprints or []):
                crud.update_incident(s, incident=inc, alert_fingerprints=[*(inc.alert_fingerprints or []), fingerprint])
        return {"incident": incident_id, "created": False, "merged_from": source}

    def _execute(self, run_id: str, active: ActiveStage, incident_id: int, kind: str, decision: dict,
                 *, actor: str) -> None:
        action = decision["action"]
        now = time.time()
        fields: dict[str, Any] = {"action": action}
        if action == "rollback":
            ckpt = decision.get("checkpoint")
            fields.update(rollback_to_step=decision.get("checkpoint_step"), skip=decision["skip"],
                          lr_multiplier=decision["lr_multiplier"], outcome="recovering",
                          attempt=decision.get("attempt", 1))
            with self.session() as s:
                crud.update_incident(s, incident=crud.get_incident(s, incident_id=incident_id), **fields)
            self._set_state(run_id, "recovering", actor=actor, reason=f"{kind}: rollback")
            active.pending = {"incident": incident_id, "kind": kind, "detected_at": now,
                              "target_step": decision.get("checkpoint_step"), "from_step": active.last_step,
                              "checkpoint": ckpt}
            self.metrics.rollbacks.labels(run=run_id, stage=active.name).inc()
            driver = self.drivers.get(run_id)
            sent = False
            ref = self._ref_for(run_id, ckpt) if ckpt is not None else None
            if ref is not None and active.group is not None:
                try:
                    active.group.control(ControlKind.ROLLBACK, {"checkpoint": ref.to_dict(), "skip": decision["skip"],
                                                                 "lr_multiplier": decision["lr_multiplier"],
                                                                 "incident": incident_id})
                    sent = True
                except Exception as e:  # noqa: BLE001 - dead group: restart with the same decision
                    log.warning("rollback control failed (%s); restarting the group instead", e)
            if not sent and driver is not None:
                active.pending["restart"] = True
                driver.request_restart(checkpoint=ckpt, incident_id=incident_id)
        elif action == "restart":
            fields.update(rollback_to_step=decision.get("checkpoint_step"), outcome="recovering")
            with self.session() as s:
                crud.update_incident(s, incident=crud.get_incident(s, incident_id=incident_id), **fields)
            self._set_state(run_id, "recovering", actor=actor, reason=f"{kind}: restart worker group")
            active.pending = {"incident": incident_id, "kind": kind, "detected_at": now,
                              "target_step": decision.get("checkpoint_step"), "restart": True}
            self.metrics.rollbacks.labels(run=run_id, stage=active.name).inc()
            driver = self.drivers.get(run_id)
            if driver is not None:
                driver.request_restart(checkpoint=decision.get("checkpoint"), incident_id=incident_id)
        elif action == "needs_attention":
            with self.session() as s:
                crud.update_incident(s, incident=crud.get_incident(s, incident_id=incident_id),
                                     action=action, outcome="needs_attention", attempt=decision.get("attempt", 0))
            if active.group is not None:
                try:
                    active.group.control(ControlKind.PAUSE, {})
                except Exception:  # noqa: BLE001
                    log.exception("pause for needs_attention failed")
            self._set_state(run_id, "needs_attention", actor=actor, reason=decision.get("reason", kind))
        else:  # notify / ignore: recorded, nothing to carry out
            with self.session() as s:
                crud.update_incident(s, incident=crud.get_incident(s, incident_id=incident_id), action=action,
                                     outcome="resolved", resolved_at=self.now_dt(), recovery_seconds=0.0)
        self._event(run_id, actor, "recovery_decision",
                    {"incident": incident_id, "kind": kind, **_jsonable({k: v for k, v in decision.items()})}, action)

    def _worker_lost(self, run_id: str, active: ActiveStage, status: dict) -> None:
        finding = {"kind": "worker_lost", "onset_step": max(active.last_step, 0),
                   "detected_at_step": max(active.last_step, 0),
                   "evidence": {"failed_rank": status.get("failed_rank"), "error": status.get("error")}}
        with self.lock(run_id):
            if active.pending is not None and active.pending.get("restart"):
                return  # already restarting
            self.handle_finding(run_id, active, finding, source="watch")

    # ---- alerts -----------------------------------------------------------------------------
    def handle_alerts(self, payload: Any, *, actor: str = "alertmanager") -> dict:
        counts = {"created": 0, "merged": 0, "resolved": 0, "ignored": 0}
        for alert in payload.alerts:
            labels = dict(alert.labels)
            run_id, kind = labels.get("run"), labels.get("trainguard_kind")
            fp = alert.fingerprint or json.dumps(labels, sort_keys=True)
            if alert.status == "resolved":
                counts["resolved"] += self._alert_resolved(run_id, fp)
                continue
            driver = self.drivers.get(run_id or "")
            active = driver.active if driver else None
            if active is None or kind is None or (labels.get("stage") and labels["stage"] != active.name):
                counts["ignored"] += 1
                continue
            finding = alert_finding(active, kind, labels, self.watch_config)
            if finding is None:
                counts["ignored"] += 1
                continue
            res = self.handle_finding(run_id, active, finding, source="alert", fingerprint=fp, actor=actor)
            counts["created" if res.get("created") else "merged"] += 1
        return counts

    def _alert_resolved(self, run_id: str | None, fingerprint: str) -> int:
        if not run_id:
            return 0
        n = 0
        with self.session() as s:
            for inc in crud.list_incidents(s, run_id=run_id, open_only=True):
                if inc.source == "alert" and fingerprint in (inc.alert_fingerprints or []) \
                        and inc.outcome == "open":
                    crud.update_incident(s, incident=inc, outcome="resolved", resolved_at=self.now_dt())
                    n += 1
        return n

    # ---- operator control -------------------------------------------------------------------
    def submit(self, spec: PipelineSpec, *, actor: str) -> str:
        with self.session() as s:
            run = crud.create_run(s, name=spec.name, spec_json=spec.model_dump_json(), actor=actor)
            run_id = run.id
        self.metrics.set_state(run_id, "pending")
        self._spawn(run_id, spec)
        return run_id

    def _require_active(self, run_id: str, what: str, states: tuple[str, ...]) -> tuple[Any, RunDriver | None]:
        run = self._get_run(run_id)
        if run.state not in states:
            raise errors.Conflict(f"cannot {what} run {run_id} in state {run.state!r}")
        return run, self.drivers.get(run_id)

    def _control(self, run_id: str, kind: ControlKind, payload: dict, *, actor: str) -> None:
        driver = self.drivers.get(run_id)
        if driver is None or driver.active is None or driver.active.group is None:
            raise errors.Conflict(f"run {run_id} has no running workers")
        driver.active.group.control(kind, payload)

    def pause(self, run_id: str, *, actor: str) -> None:
        with self.lock(run_id):
            self._require_active(run_id, "pause", ("running", "recovering", "pending"))
            self._control(run_id, ControlKind.PAUSE, {}, actor=actor)
            self._set_state(run_id, "paused", actor=actor, reason="operator pause")

    def resume(self, run_id: str, *, actor: str) -> None:
        with self.lock(run_id):
            run, driver = self._require_active(run_id, "resume", ("paused", "needs_attention"))
            if run.state == "needs_attention" and driver is None:
                self._set_state(run_id, "running", actor=actor, reason="operator resume after needs_attention")
                self._spawn(run_id, parse_pipeline(json.loads(run.spec)))
                return
            self._control(run_id, ControlKind.RESUME, {}, actor=actor)
            self._mark_resumed(driver)
            self._set_state(run_id, "running", actor=actor, reason="operator resume")

    @staticmethod
    def _mark_resumed(driver: RunDriver | None) -> None:
        if driver is not None and driver.active is not None:
            driver.active.resumed_at = time.time()

    def stop(self, run_id: str, *, actor: str) -> None:
        """Stopped means stopped, whatever the run was doing: the workers write a last checkpoint
        when they can (a running or paused group gets STOP), the driver ends the stage and kills
        every actor of the run, and every stage row ends final (`_close_stages`)."""
        with self.lock(run_id):
            run, driver = self._require_active(run_id, "stop", ("pending", "running", "paused", "recovering",
                                                                 "needs_attention"))
            self._set_state(run_id, "stopped", actor=actor, reason="operator stop")
            if driver is not None and driver.active is not None and driver.active.pending is not None:
                driver.active.pending = None  # a recovery in flight is abandoned, not resumed
            try:
                self._control(run_id, ControlKind.STOP, {}, actor=actor)
                if driver is not None:
                    driver.request_stop()
            except errors.Conflict:  # no group now (starting, restarting): nothing to wait for
                if driver is not None:
                    driver.halt()
            self._close_open_incidents(run_id, outcome="ignored", reason="run stopped")
            if driver is None:
                self._close_stages(run_id)

    def _close_open_incidents(self, run_id: str, *, outcome: str, reason: str) -> None:
        with self.session() as s:
            for inc in crud.list_incidents(s, run_id=run_id, open_only=True):
                crud.update_incident(s, incident=inc, outcome=outcome, resolved_at=self.now_dt(),
                                     evidence={**(inc.evidence or {}), "closed": reason})

    def _close_stages(self, run_id: str) -> None:
        """The driver ended: no stage row stays running. A stopped run's unfinished stages are
        stopped; a failed run's running stage failed; the rest stays as it was (pending stages
        of a run that will be resumed, e.g. needs_attention, stay pending)."""
        with self.session() as s:
            run = crud.get_run(s, run_id=run_id)
            if run is None:
                return
            final = {"stopped": "stopped", "failed": "failed"}.get(run.state)
            for st in crud.list_stages(s, run_id=run_id):
                if st.state in ("completed", "stopped", "failed", "skipped"):
                    continue
                if final is not None:
                    crud.update_stage(s, stage=st, state=final, finished_at=self.now_dt())

    def anneal(self, run_id: str, *, steps: int, final_lr: float, schedule: str,
               mixture: dict[str, float] | None, actor: str) -> None:
        with self.lock(run_id):
            run, _ = self._require_active(run_id, "anneal", ("running", "paused", "recovering"))
            if mixture:
                spec = parse_pipeline(json.loads(run.spec))
                known = {"web", "curated", *spec.data}
                unknown = sorted(set(mixture) - known)
                if unknown:
                    raise errors.InvalidRequest(f"mixture names unknown source(s) {unknown} (known: {sorted(known)})")
            payload = {"steps": steps, "final_lr": final_lr, "schedule": schedule, "mixture": mixture}
            self._control(run_id, ControlKind.ANNEAL, payload, actor=actor)
            self._event(run_id, actor, "anneal", payload, "sent")

    def rollback(self, run_id: str, *, checkpoint_id: int | None, actor: str, skip: bool = True,
                 lr_multiplier: float | None = None) -> dict:
        """Roll back to `checkpoint_id` (or the newest good checkpoint). `skip`: never train on the
        batches since that checkpoint again; `lr_multiplier`: factor on the LR in effect at the
        checkpoint (None: the recovery policy's backoff)."""
        with self.lock(run_id):
            run, driver = self._require_active(run_id, "roll back", ("running", "paused", "recovering",
                                                                     "needs_attention"))
            active = driver.active if driver else None
            if active is None:
                raise errors.Conflict(f"run {run_id} has no running stage to roll back")
            with self.session() as s:
                if checkpoint_id is not None:
                    ckpt = crud.get_checkpoint(s, run_id=run_id, checkpoint_id=checkpoint_id)
                    if ckpt is None:
                        raise errors.NotFound(f"checkpoint {checkpoint_id} not found in run {run_id}")
                    if ckpt.stage_name != active.name:
                        raise errors.Conflict(f"checkpoint {checkpoint_id} belongs to stage {ckpt.stage_name!r}, "
                                              f"the run is in stage {active.name!r}")
                    if ckpt.deleted_at is not None:
                        raise errors.Conflict(f"checkpoint {checkpoint_id} was deleted (retention or a rollback)")
                    if ckpt.bad_reason or not ckpt.verified or not ckpt.files:
                        raise errors.Conflict(f"checkpoint {checkpoint_id} is not usable: "
                                              f"{ckpt.bad_reason or 'not reported by a worker'}")
                    wanted_step = ckpt.step
                else:
                    ckpt, wanted_step = None, None
            if ckpt is not None and not self._recheck(ckpt, force=True):
                raise errors.Conflict(f"checkpoint {checkpoint_id} no longer holds the bytes its worker wrote "
                                      f"(deleted, replaced or corrupt); nothing was changed")
            finding = {"kind": "operator_rollback", "onset_step": max(active.last_step, 0),
                       "detected_at_step": max(active.last_step, 0),
                       "evidence": {"requested_checkpoint": checkpoint_id, "requested_checkpoint_step": wanted_step,
                                    "by": actor, "skip": bool(skip), "lr_multiplier": lr_multiplier}}
            if run.state in ("paused", "needs_attention") and active.group is not None:
                active.group.control(ControlKind.RESUME, {})
                self._mark_resumed(driver)
            active.pending = None
            res = self.handle_finding(run_id, active, finding, source="operator", actor=actor)
            with self.session() as s:
                inc = crud.get_incident(s, incident_id=res["incident"])
            return {"incident": inc.id, "action": inc.action, "rollback_to_step": inc.rollback_to_step}

    # ---- discovery, goodput -----------------------------------------------------------------
    def sd_targets(self) -> list[dict]:
        groups = [{"targets": [f"{self.settings.host}:{self.settings.port}"],
                   "labels": {"job": "trainguard-supervisor", "component": "supervisor"}}]
        for _, active in self.active_stages():
            for t in active.targets:
                groups.append({"targets": [t.address], "labels": {"job": "trainguard-workers", "run": t.run,
                                                                   "stage": t.stage, "rank": str(t.rank)}})
        return groups

    def metrics_text(self) -> bytes:
        return self.metrics.text()

    def goodput_of(self, run_id: str) -> float | None:
        """Productive step time / wall time since submission, less the time an operator kept the
        run paused. Productive: the step time of rank 0's steps that still count (steps replayed
        after a rollback or restart count once). Lost: start-up, evaluation, checkpoint stalls,
        detection and recovery, replayed steps, and time in needs_attention (docs/operations.md)."""
        t0 = self._run_started.get(run_id)
        if t0 is None:
            return None
        d = self.drivers.get(run_id)
        active = d.active if d else None
        useful = self._useful_done.get(run_id, 0.0) + (sum(active.useful.values()) if active else 0.0)
        end = self._run_ended.get(run_id, time.time())
        wall = end - t0 - self._paused_total.get(run_id, 0.0)
        if run_id in self._paused_since:
            wall -= end - self._paused_since[run_id]
        return min(1.0, useful / wall) if wall > 0 else None

    def goodput_once(self, run_ids: list[str] | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        with self._glock:
            ids = [r for r in self.drivers if run_ids is None or r in run_ids]
        for run_id in ids:
            ratio = self.goodput_of(run_id)
            if ratio is None:
                continue
            out[run_id] = ratio
            self.metrics.goodput.labels(run=run_id).set(ratio)
            with self.session() as s:
                crud.update_run(s, run=crud.get_run(s, run_id=run_id), goodput=ratio)
        return out


def _stat_sig(path: str) -> tuple[int, int]:
    """(total size, newest mtime) of a checkpoint dir: a byte flipped in place changes it."""
    size, mtime = 0, 0
    try:
        for entry in os.scandir(path):
            st = entry.stat()
            size += st.st_size
            mtime = max(mtime, st.st_mtime_ns)
    except OSError:
        pass
    return size, mtime


def _finite(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))


def _jsonable(obj: Any) -> Any:
    """Evidence goes into JSON columns: NaN/inf become strings, tuples lists."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not _finite(obj):
        return str(obj)
    if hasattr(obj, "value") and hasattr(obj, "name"):  # enums
        return obj.value
    return obj
