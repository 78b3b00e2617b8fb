"""The run driver: one thread per run that walks its stages and owns the current stage's
worker group.

    for each unfinished stage: start a group (from the stage's resume point, with the skip list
    and LR multiplier its recoveries left in effect) --> poll it --> register the checkpoints
    its rank 0 reports --> finished: a last watch pass, then the stage is done (or, if a
    rollback was decided that the loop ended too soon to apply, restarted) | failed: worker
    lost | restart requested: a new group from the decided checkpoint | stop: end the stage

A group that cannot be placed (its placement group not ready in time: WorkerGroup.start
raises InsufficientResources) is an `insufficient_resources` incident — the policy says
needs_attention — and the run ends here until an operator resumes it; never a hang.

An elastic stage (`min_world_size`) may get a group smaller than its world_size (WorkerGroup
shrinks it when the full size cannot be placed; never the stage's very first group), or a
later group larger than the one before:
every change of the stage's world size is a `world_size_changed` event and a Grafana
annotation (`DriverParts.annotate`).

Other threads talk to it through `request_restart`, `request_stop` and `halt`; the group is
swapped only on this thread.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainguard.service.domain.detectors import Finding, IncidentKind
from trainguard.service.domain.policy import in_effect
from trainguard.service.domain.proposal import RecoveryMode
from trainguard.service.domain.state import RunState, StageState
from trainguard.service.supervisor.catalog import CheckpointCatalog
from trainguard.service.supervisor.executor import RecoveryExecutor
from trainguard.service.supervisor.goodput import GoodputClock
from trainguard.service.supervisor.ingest import Watch
from trainguard.service.supervisor.ledger import Ledger
from trainguard.service.supervisor.stage import ActiveStage
from trainguard.workers.contract import CheckpointRef, ControlKind
from trainguard.workers.spec import PipelineSpec

__all__ = ["RunDriver", "DriverParts", "STOP_GRACE_S", "START_DEADLINE_ENV", "START_TRIES", "start_worker_group",
           "attach_worker_group",
           "start_deadline_s"]

log = logging.getLogger(__name__)

STOP_GRACE_S = 30.0
"""How long a stopped group may take to write its last checkpoint before it is killed."""
START_DEADLINE_ENV = "TRAINGUARD_GROUP_START_DEADLINE_S"
DEFAULT_START_DEADLINE_S = 300.0
"""How long a worker group started for a recovery may take to its first step (the model and
checkpoint loaded, the process group up) before it is torn down and started again."""
START_TRIES = 3
"""Worker groups a recovery may start before the run needs an operator."""
_POLL_S = 0.2


def start_deadline_s() -> float:
    return float(os.environ.get(START_DEADLINE_ENV, DEFAULT_START_DEADLINE_S))


def _insufficient_resources(e: BaseException) -> bool:
    """Whether a group's start failed because it could not be placed (workers.group.InsufficientResources)."""
    from trainguard.workers.group import InsufficientResources

    return isinstance(e, InsufficientResources)


def start_worker_group(**kwargs: Any) -> Any:
    """The real thing: a Ray worker group for one stage (trainguard.workers.group)."""
    from trainguard.workers.group import WorkerGroup

    group = WorkerGroup(**kwargs)
    group.start()
    return group


def attach_worker_group(**kwargs: Any) -> Any:
    """The real thing: a detached Ray worker group a previous supervisor started, or None
    (trainguard.workers.group.attach_group)."""
    from trainguard.workers.group import attach_group

    return attach_group(**kwargs)


@dataclass
class DriverParts:
    """What a driver works with: the supervisor's parts, and how to start a worker group."""

    ledger: Ledger
    catalog: CheckpointCatalog
    executor: RecoveryExecutor
    watch: Watch
    goodput: GoodputClock
    state_dir: Path
    start_group: Callable[..., Any] = start_worker_group
    attach_group: Callable[..., Any] = lambda **kwargs: None
    """A detached group of the stage a previous supervisor started, re-attached, or None."""
    publish_goodput: Callable[[str], None] = lambda run_id: None
    on_exit: Callable[[str], None] = lambda run_id: None
    annotate: Callable[[str, list[str]], None] = lambda text, tags: None
    """A Grafana annotation (text, tags) for an event an operator should see on the dashboards."""


class RunDriver(threading.Thread):
    def __init__(self, parts: DriverParts, run_id: str, spec: PipelineSpec, *, start_paused: bool = False,
                 reattach: bool = False) -> None:
        super().__init__(name=f"driver-{run_id}", daemon=True)
        self.parts = parts
        self.run_id = run_id
        self.spec = spec
        self.commands: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.active: ActiveStage | None = None
        self.stage_lock = threading.RLock()  # guards `active` and its group against the swap
        self.start_paused = start_paused
        self.reattach = reattach  # adopted after a supervisor restart: first try the live detached group
        self._halt = threading.Event()
        self._stop_deadline: float | None = None  # set by request_stop: wait for the workers' stop, then end

    # ---- requests from other threads -----------------------------------------------------------
    def request_restart(self, *, checkpoint: str | None, incident: int | None) -> None:
        self.commands.put(("restart", {"checkpoint": checkpoint, "incident": incident}))

    def halt(self) -> None:
        self._halt.set()
        self.commands.put(("halt", {}))

    def request_stop(self) -> None:
        """The run was stopped: let the workers write their stop checkpoint (they got the STOP
        control), then end the stage; kill the group if that takes longer than STOP_GRACE_S."""
        self._stop_deadline = time.monotonic() + STOP_GRACE_S
        self.commands.put(("stop", {}))

    def running_stage(self) -> ActiveStage | None:
        """The stage with a live worker group, if any."""
        with self.stage_lock:
            return self.active if self.active is not None and self.active.group is not None else None

    # ---- thread body ---------------------------------------------------------------------------
    def run(self) -> None:
        ledger = self.parts.ledger
        try:
            self._run_stages()
        except Exception as e:  # noqa: BLE001 - a driver failure must mark the run, not vanish
            log.exception("run %s failed", self.run_id)
            ledger.set_state(self.run_id, RunState.FAILED, actor="supervisor", reason=f"driver error: {e}")
        finally:
            self._shutdown_group()
            ledger.close_stages(self.run_id)
            self.parts.on_exit(self.run_id)

    def _run_stages(self) -> None:
        ledger = self.parts.ledger
        while not self._halt.is_set():
            if ledger.run_state(self.run_id) in (RunState.STOPPED, RunState.FAILED, RunState.COMPLETED,
                                                 RunState.NEEDS_ATTENTION):
                return
            stages = ledger.stages(self.run_id)
            todo = [st for st in stages if st.state != StageState.COMPLETED]
            outputs = {st.name: st.output_checkpoint for st in stages if st.output_checkpoint}
            if not todo:
                self.parts.goodput.ended(self.run_id)
                self.parts.publish_goodput(self.run_id)
                ledger.set_state(self.run_id, RunState.COMPLETED, actor="supervisor", reason="all stages completed")
                return
            st = todo[0]
            if not self._run_stage(ActiveStage(run_id=self.run_id, name=st.name, kind=st.kind, index=st.index,
                                               steps=st.steps), outputs, first=st.started_at is None):
                return

    def _reattach(self, active: ActiveStage) -> Any:
        """The stage's detached worker group a previous supervisor process started, if it is whole
        and alive (workers/group.py `attach_group`); None otherwise (the stage then restarts from
        its newest good checkpoint, as after any supervisor restart)."""
        try:
            return self.parts.attach_group(run_id=self.run_id, spec=self.spec, stage_name=active.name,
                                           state_dir=self.parts.state_dir,
                                           fired_dir=self.parts.state_dir / "runs" / self.run_id / "faults")
        except Exception:  # noqa: BLE001 - not re-attachable: restart as before
            log.warning("run %s: re-attaching to stage %s failed", self.run_id, active.name, exc_info=True)
            return None

    def _new_group(self, stage: str, outputs: dict[str, str], resume_from: CheckpointRef | None, *,
                   shrink: bool = True) -> Any:
        """The earlier stages' outputs go to the workers with the hashes recorded when they were
        reported; an output the store has no hashes for is not handed over. `shrink`: an elastic
        stage's group may start smaller than its world_size (every group but a stage's very first)."""
        skip, lr = in_effect(self.parts.ledger.attempts(self.run_id, stage))
        inputs = {name: ref for name, path in outputs.items()
                  if (ref := self.parts.catalog.ref_for(self.run_id, path)) is not None}
        return self.parts.start_group(
            run_id=self.run_id, spec=self.spec, stage_name=stage, state_dir=self.parts.state_dir,
            resume_from=resume_from, skip=skip, lr_multiplier=lr, inputs=inputs,
            fired_dir=self.parts.state_dir / "runs" / self.run_id / "faults", shrink=shrink)

    def _run_stage(self, active: ActiveStage, outputs: dict[str, str], *, first: bool = False) -> bool:
        """True when the stage completed; False when the run ends here (stop, halt, failure).
        `first`: the stage never had a group: an elastic stage's first group takes its full size
        (or waits for it); a later one — an operator's resume, the supervisor's restart — may shrink."""
        parts, ledger = self.parts, self.parts.ledger
        group = self._reattach(active) if self.reattach and not first else None
        self.reattach = False
        resume = None if group is not None else parts.catalog.resume_point(self.run_id, active.name)
        if group is None:
            ledger.start_stage(self.run_id, active.name)
            try:
                group = self._new_group(active.name, outputs, resume, shrink=not first)
            except Exception as e:
                if not _insufficient_resources(e):
                    raise
                self._unplaceable(active, e)
                return False
        targets = parts.watch.targets_of(active, group)  # waits for the workers: not under the lock
        with self.stage_lock:
            active.group, active.targets = group, targets
            self.active = active
        state = ledger.run_state(self.run_id)
        if state == RunState.PENDING:
            ledger.set_state(self.run_id, RunState.RUNNING, actor="supervisor", reason=f"stage {active.name} started")
        if self.start_paused or state == RunState.PAUSED:
            self.start_paused = False
            group.control(ControlKind.PAUSE, {})
        attached = bool(getattr(group, "attached", False))
        self._note_world_size(active, group, cause="reattach" if attached else "resume" if resume is not None
                              else "start", incident=None, checkpoint=resume.path if resume else None)
        if attached:
            ledger.event(self.run_id, "supervisor", "reattached",
                         {"stage": active.name, "world_size": active.world_size,
                          "ranks": [{k: i.get(k) for k in ("rank", "pid", "actor_id", "state")}
                                    for i in getattr(group, "identities", [])]},
                         "the live worker group goes on: nothing restarted, nothing loaded")
        else:
            ledger.event(self.run_id, "supervisor", "stage_started",
                         {"stage": active.name, "resume_from": resume.path if resume else None,
                          "world_size": active.world_size}, "ok")
        while not self._halt.is_set():
            try:
                cmd, arg = self.commands.get(timeout=_POLL_S)
            except queue.Empty:
                cmd, arg = "", {}
            if cmd == "halt":
                return False
            if cmd == "restart" and self._stop_deadline is None:
                if not self._restart(active, outputs, arg):
                    return False
                continue
            status = self._poll()
            if status is None:
                if self._stop_deadline is not None:
                    return False  # stopped while no group runs (a restart was under way)
                continue
            parts.catalog.register(self.run_id, active.name, status.get("checkpoints", []))
            outcome = self._react(active, outputs, status)
            if outcome is not None:
                return outcome
        return False

    def _react(self, active: ActiveStage, outputs: dict[str, str], status: dict[str, Any]) -> bool | None:
        """What the group's state means for the stage: True done, False the run ends, None go on."""
        state = status["state"]
        if self._stop_deadline is not None:
            late = time.monotonic() > self._stop_deadline
            if state not in ("stopped", "finished", "failed") and not late:
                return None
            # how the stage ended: the workers' own stop (its checkpoint written) or killed
            graceful = state in ("stopped", "finished")
            self.parts.ledger.event(self.run_id, "supervisor", "stage_stopped",
                                    {"stage": active.name, "workers": state,
                                     "step": max([int(r.get("step") or 0) for r in status.get("ranks", [])] or [0])},
                                    "ok" if graceful else f"killed: the workers did not stop within {STOP_GRACE_S:g} s")
            return False
        if state == "finished":
            # done only once the watch has seen its last steps: a problem in them is handled (a
            # rollback the loop ended too soon to apply restarts the stage)
            self.parts.watch.once(run_ids=[self.run_id])
            with self.parts.ledger.lock(self.run_id):
                if self._proposal_waits(active):
                    return None  # decided first: approved, it restarts the stage; else the stage is done
                restart = self._rollback_missed(active, status)
                active.done = restart is None
            if restart is not None:
                return None if self._restart(active, outputs, restart) else False
            self._finish_stage(active, status)
            return True
        if state == "stopped":
            self.parts.ledger.set_state(self.run_id, RunState.STOPPED, actor="supervisor",
                                        reason=f"stage {active.name} stopped")
            return False
        pend = active.pending  # a group started for a recovery has a deadline to its first step
        late = (pend is not None and pend.restart and pend.group_started
                and time.time() - active.started_at > start_deadline_s())
        if state == "failed" or late:
            start = self._start_failed(active, status, late=state != "failed")
            if start is False:
                return False  # out of tries: the run needs an operator
            if isinstance(start, dict):
                return None if self._restart(active, outputs, start) else False
        if state == "failed":
            self.parts.executor.worker_lost(self.run_id, active, status)
        return None

    def _start_failed(self, active: ActiveStage, status: dict[str, Any], *,
                      late: bool) -> dict[str, Any] | bool | None:
        """A group started for a recovery died, or reached no step within the deadline, before
        the recovery took effect (its first step completes it): start another one from the same
        checkpoint (fresh workers: none from a lost node), up to START_TRIES groups; then the
        run needs an operator (False). None: not such a group, the caller goes on."""
        with self.parts.ledger.lock(self.run_id):
            pend = active.pending
            if pend is None or not (pend.restart and pend.group_started):
                return None
            pend.start_failures += 1
            why = (f"no step within {start_deadline_s():g} s" if late
                   else f"failed before its first step: {status.get('error') or 'a rank died'}")
            nodes = sorted({str(r["node"]) for r in status.get("ranks") or [] if r.get("node_alive") is False})
            self.parts.ledger.event(self.run_id, "supervisor", "group_start_failed",
                                    {"stage": active.name, "incident": pend.incident, "attempt": pend.start_failures,
                                     "reason": why, **({"lost_nodes": nodes} if nodes else {})},
                                    "retry" if pend.start_failures < START_TRIES else "needs_attention")
            if pend.start_failures >= START_TRIES:
                self.parts.executor.give_up(self.run_id, active,
                                            f"{pend.start_failures} worker groups started for incident {pend.incident} "
                                            f"did not reach their first step (last: {why})")
                return False
            log.warning("run %s: the worker group restarted for incident %s %s; starting another",
                        self.run_id, pend.incident, why)
            return {"checkpoint": pend.checkpoint, "incident": pend.incident}

    def _proposal_waits(self, active: ActiveStage) -> bool:
        """Under the run's lock: an approve-mode proposal for this stage waits for an operator.
        The group may have finished before the pause that holds it arrived (a problem in the
        stage's last steps): its output is what the proposal would undo, so the stage is not
        done until the proposal is decided (approved: carried out like a rollback the loop
        ended too soon to apply)."""
        waiting = [p for p in self.parts.ledger.waiting_proposals(self.run_id, active.name)
                   if p.mode == RecoveryMode.APPROVE.value]
        if waiting and not active.held_by_proposal:
            active.held_by_proposal = True
            self.parts.ledger.event(self.run_id, "supervisor", "stage_held",
                                    {"stage": active.name, "proposals": [p.id for p in waiting]},
                                    "the stage completes once its proposals are decided")
        return bool(waiting)

    def _rollback_missed(self, active: ActiveStage, status: dict[str, Any]) -> dict[str, Any] | None:
        """Under the run's lock, the group finished with a rollback in flight. Applied (the
        workers report its incident): recovered, whether or not its steps were scraped. Not
        applied (the loop ended before its next boundary): the stage's output holds what the
        rollback was to undo; returns the restart from the rollback's checkpoint to carry out
        (the incident's skip and LR multiplier go to the new group)."""
        pend = active.pending
        if pend is None or pend.restart:
            return None
        if pend.incident in status.get("rollbacks_applied", []):
            self.parts.executor.recovered(active, step=active.last_step, at=time.time())
            return None
        pend.restart = True
        log.warning("run %s: stage %s finished before its rollback (incident %s) applied; restarting from %s",
                    self.run_id, active.name, pend.incident, pend.checkpoint)
        return {"checkpoint": pend.checkpoint, "incident": pend.incident}

    def _poll(self) -> dict[str, Any] | None:
        active = self.running_stage()
        if active is None:
            return None
        try:
            status: dict[str, Any] = active.group.poll()
            return status
        except Exception as e:  # noqa: BLE001 - Ray errors while polling are worker loss
            log.warning("poll of %s failed: %s", self.run_id, e)
            return {"state": "failed", "error": str(e), "failed_rank": None, "ranks": []}

    def _restart(self, active: ActiveStage, outputs: dict[str, str], arg: dict[str, Any]) -> bool:
        """A new group from the decided checkpoint; False when none could be placed (the run
        needs an operator: it ends here)."""
        parts = self.parts
        with self.stage_lock:
            old, active.group, active.targets = active.group, None, []
        if old is not None:
            try:
                old.shutdown()
            except Exception:  # noqa: BLE001
                log.exception("shutdown of old group failed")
        parts.watch.forget(old)
        checkpoint = arg.get("checkpoint")
        try:
            group = self._new_group(active.name, outputs,
                                    parts.catalog.ref_for(self.run_id, checkpoint) if checkpoint else None)
        except Exception as e:
            if not _insufficient_resources(e):
                raise
            self._unplaceable(active, e)
            return False
        targets = parts.watch.targets_of(active, group)
        with parts.ledger.lock(self.run_id), self.stage_lock:  # the lock order everywhere: run, then stage
            if self._halt.is_set() or self._stop_deadline is not None:
                # stopped while the new group was coming up: it ends with the run (the driver's
                # finally kills it), it does not train
                active.group, active.targets = group, targets
                self._halt.set()
                return True
            pend = active.pending
            active.new_group(group, targets, resumed_at_step=pend.target_step if pend is not None else None)
            cause, incident = (pend.kind, pend.incident) if pend is not None else ("restart", arg.get("incident"))
        self._note_world_size(active, group, cause=cause, incident=incident, checkpoint=checkpoint)
        parts.ledger.event(self.run_id, "supervisor", "group_restarted",
                           {"stage": active.name, "checkpoint": checkpoint, "world_size": active.world_size}, "ok")
        return True

    def _note_world_size(self, active: ActiveStage, group: Any, *, cause: str, incident: int | None,
                         checkpoint: str | None) -> None:
        """Record the size the stage's new group got (`WorkerGroup.world_size`: what its ranks
        train with). A size other than the stage's last one — the previous group's, or, for this
        driver's first group, the last `world_size_changed` event's (else the declared size) — is
        a `world_size_changed` event and a Grafana annotation."""
        stage = self.spec.stage(active.name)
        size = getattr(group, "world_size", None)
        if not isinstance(size, int):
            size = stage.world_size  # a group that does not say (a test's fake) runs the declared size
        before = active.world_size
        if before is None:
            last = self.parts.ledger.last_event(self.run_id, "world_size_changed", stage=active.name)
            before = int(last["to"]) if last is not None else stage.world_size
        active.world_size, active.declared_world_size = size, stage.world_size
        if size == before:
            return
        how = "shrunk" if size < before else "grown"
        elastic = getattr(group, "elastic", None)
        detail: dict[str, Any] = {
            "stage": active.name, "from": before, "to": size, "declared": stage.world_size,
            "min_world_size": stage.min_world_size, "cause": cause, "incident": incident, "checkpoint": checkpoint,
            "micro_batch_size": elastic.get("micro_batch_size") if isinstance(elastic, dict) else None,
            "placement": elastic if isinstance(elastic, dict) else None}
        self.parts.ledger.event(self.run_id, "supervisor", "world_size_changed", detail, how)
        log.warning("run %s: stage %s %s from %s to %s ranks (%s)", self.run_id, active.name, how, before, size, cause)
        why = cause + (f", incident {incident}" if incident is not None else "")
        where = f" from {checkpoint}" if checkpoint else ""
        text = (f"{active.name}: world size {before} -> {size} ranks ({how}; declared {stage.world_size}, "
                f"min {stage.min_world_size}; {why}){where}")
        tags = ["trainguard", "world_size", f"run:{self.run_id}", f"stage:{active.name}", f"state:{how}"]
        try:
            self.parts.annotate(text, tags)
        except Exception:  # noqa: BLE001 - an annotation never stands in the way of a restart
            log.warning("world-size annotation for %s failed", self.run_id, exc_info=True)

    def _unplaceable(self, active: ActiveStage, err: BaseException) -> None:
        """The stage's worker group could not be placed in time: an `insufficient_resources`
        incident (evidence: what was asked, what is free), which the policy hands to an operator;
        a recovery that needed the group is given up with it. The run then needs attention."""
        parts = self.parts
        step = max(active.last_step, 0)
        evidence = {**dict(getattr(err, "evidence", {}) or {}), "error": str(err)[:2000]}
        log.warning("run %s: stage %s could not be placed: %s", self.run_id, active.name, err)
        if parts.ledger.run_state(self.run_id) == RunState.PENDING:
            # the run's first group: pending runs may not need attention; it was starting
            parts.ledger.set_state(self.run_id, RunState.RUNNING, actor="supervisor",
                                   reason=f"stage {active.name} starting")
        handled = parts.executor.handle(self.run_id, active,
                                        Finding(IncidentKind.INSUFFICIENT_RESOURCES.value, step, step, evidence),
                                        source="watch")
        with parts.ledger.lock(self.run_id):
            pend = active.pending
            state = parts.ledger.run_state(self.run_id)
            if state in (RunState.STOPPED, RunState.FAILED, RunState.COMPLETED):
                return  # ended meanwhile (an operator's stop): nothing waits for a group
            if (pend is not None and pend.incident != handled.incident) or state != RunState.NEEDS_ATTENTION:
                # the recovery in flight cannot be carried out; or the incident merged into an
                # open one: either way the run waits for an operator
                parts.executor.give_up(self.run_id, active,
                                       f"stage {active.name}: the worker group could not be placed "
                                       f"(incident {handled.incident}): {str(err)[:500]}")

    def _finish_stage(self, active: ActiveStage, status: dict[str, Any]) -> None:
        parts = self.parts
        parts.catalog.scan([self.run_id])  # what retention deleted in the last seconds
        parts.goodput.stage_finished(self.run_id, active.productive_seconds())
        parts.ledger.update_stage(self.run_id, active.name, state=StageState.COMPLETED.value,
                                  finished_at=parts.ledger.now(), output_checkpoint=status.get("output_checkpoint"),
                                  step=active.steps, final_loss=active.last_loss, last_loss=active.last_loss)
        parts.ledger.event(self.run_id, "supervisor", "stage_completed",
                           {"stage": active.name, "output_checkpoint": status.get("output_checkpoint")}, "ok")
        self._shutdown_group()

    def _shutdown_group(self) -> None:
        with self.stage_lock:
            active, self.active = self.active, None
        if active is not None and active.group is not None:
            try:
                active.group.shutdown()
            except Exception:  # noqa: BLE001
                log.exception("group shutdown failed")
            self.parts.watch.forget(active.group)
