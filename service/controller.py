"""The supervisor's facade: what the API (service/api/ports.py), the scheduler and the CLI's
embedded mode call. It wires the parts in service/supervisor/ and answers operator requests:

- `Ledger` — every store write, per-run locks;
- `CheckpointCatalog` — registered checkpoints, verification, quarantine, resume points;
- `RecoveryExecutor` — finding -> incident -> policy decision -> carried out;
- `Watch` — the fetch/ingest/detect cycle and Alertmanager's alerts;
- `RunDriver` — one thread per run walking its stages, owning the worker group;
- `GoodputClock` — productive time / wall time.

Threads: one driver per run; the scheduler's jobs call `watch_once`, `checkpoints_once` and
`goodput_once`; API threads call the control methods. Every decision about a run happens under
that run's lock, so the same problem reported twice leads to one recovery.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from trainguard.service import errors
from trainguard.service.adapters.metrics import DirectScrapeSource, MetricsSource, PrometheusSource
from trainguard.service.domain.detectors import Finding
from trainguard.service.domain.evaluate import WatchConfig
from trainguard.service.domain.policy import Action
from trainguard.service.domain.proposal import ProposalState, RecoveryMode
from trainguard.service.domain.state import ACTIVE_RUN_STATES, TERMINAL_RUN_STATES, RunState
from trainguard.service.db.models import Proposal
from trainguard.service.supervisor.catalog import CheckpointCatalog
from trainguard.service.supervisor.driver import DriverParts, RunDriver, attach_worker_group as attach_group, start_worker_group
from trainguard.service.supervisor.executor import OPERATOR_ROLLBACK, RecoveryExecutor
from trainguard.service.supervisor.goodput import GoodputClock
from trainguard.service.supervisor.ingest import Watch
from trainguard.service.supervisor.ledger import Ledger
from trainguard.service.supervisor.stage import ActiveStage
from trainguard.service.telemetry import SupervisorMetrics
from trainguard.workers.contract import ControlKind
from trainguard.workers.spec import CustomStage, LoopStage, PipelineSpec, parse_pipeline
from trainguard.workers.usercode import UserCode, check_entrypoints_remote, entrypoint_refusal

__all__ = ["Controller", "ActiveStage", "RunDriver"]

log = logging.getLogger(__name__)

USER_CODE_CHECK_TIMEOUT_S = 60.0
"""How long the entrypoint check at submit (a Ray task importing the user's modules) may take."""



class Controller:
    def __init__(self, settings: Any, *, engine: Any = None, source: MetricsSource | None = None,
                 watch_config: WatchConfig | None = None, metrics: SupervisorMetrics | None = None) -> None:
        from trainguard.service.db import init_db, make_engine

        self.settings = settings
        self.state_dir = Path(settings.state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.engine = engine or make_engine(settings.resolved_database_url())
        init_db(self.engine)
        self.source: MetricsSource = source or (
            PrometheusSource(settings.prometheus_url) if settings.prometheus_url else DirectScrapeSource())
        self.watch_config = watch_config or WatchConfig.from_settings(settings)
        self.metrics = metrics or SupervisorMetrics()
        self.drivers: dict[str, RunDriver] = {}
        self._drivers_lock = threading.Lock()
        self.ledger = Ledger(self.engine)
        self.goodput = GoodputClock()
        self.ledger.on_state_change(self.goodput.state_changed)
        self.ledger.on_state_change(lambda run_id, state: self.metrics.set_state(run_id, state.value))
        self.catalog = CheckpointCatalog(self.ledger, self.metrics.incidents)
        self.annotator = _grafana_annotator(settings)
        self.executor = RecoveryExecutor(self.ledger, self.catalog, self.metrics, self.watch_config, self,
                                         approval_timeout=getattr(settings, "approval_timeout", None),
                                         on_proposal=self._proposal_event)
        self.watch = Watch(self.ledger, self.executor, self.source, self.watch_config, self._running_stages,
                           detect=settings.watch_enabled)
        # the deployment's allow-list for custom and loop stages (Settings.user_code_modules/paths)
        self.user_code = UserCode(modules=tuple(getattr(settings, "user_code_modules", ()) or ()),
                                  paths=tuple(getattr(settings, "user_code_paths", ()) or ()))
        mode = getattr(settings, "detached_workers", "auto")
        self.detached = mode == "on" or (mode == "auto" and bool(os.environ.get("RAY_ADDRESS")))
        self.parts = DriverParts(ledger=self.ledger, catalog=self.catalog, executor=self.executor, watch=self.watch,
                                  goodput=self.goodput, state_dir=self.state_dir,
                                  start_group=functools.partial(start_worker_group, user_code=self.user_code.to_dict()),
                                  annotate=self._annotate,
                                  attach_group=functools.partial(attach_group, user_code=self.user_code.to_dict()),
                                  publish_goodput=self._publish_goodput,
                                  on_exit=self._driver_done)
        self._started = False

    # ---- lifecycle ---------------------------------------------------------------------------
    def session(self) -> Any:
        return self.ledger.session()

    def lock(self, run_id: str) -> threading.RLock:
        return self.ledger.lock(run_id)

    def start(self) -> None:
        """Connect to Ray and pick up every run that was active when the supervisor last stopped."""
        import ray

        from trainguard.workers.group import DETACHED_NAMESPACE, reap_detached, use_detached_groups, warm_pool

        if not ray.is_initialized():
            # $RAY_ADDRESS: a cluster (worker groups are gang-scheduled on its nodes). Without it,
            # "local": always a Ray of our own — plain ray.init() would join whatever cluster Ray's
            # address file (/tmp/ray/ray_current_cluster, written by `ray start` and cluster_utils)
            # or a running GCS on this machine points at, someone else's included.
            # Detached groups' placement groups are named in our namespace: a restarted supervisor
            # finds them there.
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                     log_to_driver=False, configure_logging=False, ignore_reinit_error=True,
                     namespace=DETACHED_NAMESPACE if self.detached else None)
        use_detached_groups(self.detached)
        active = self.ledger.runs_in(ACTIVE_RUN_STATES)
        if self.detached:
            # the rank actors of runs that ended (or were stopped) while no supervisor ran
            reaped = reap_detached(keep=[r.id for r in active])
            if reaped:
                log.warning("killed %d detached actors of runs no longer active (and old spares): %s",
                            len(reaped), ", ".join(reaped[:20]))
        warm_pool().refill()  # spare workers import torch now, not when the first stage starts
        self._started = True
        for run in active:
            self._adopt(run)

    def _adopt(self, run: Any) -> None:
        """A run that was active under a previous supervisor process. Detached mode: its current
        stage's live worker group is re-attached as it is (nothing restarted, nothing loaded);
        otherwise — or when that group is gone — its workers went with the old process, and the
        current stage restarts from its newest good checkpoint. What was in flight is closed (a
        restart carries those decisions out: skip list and LR come from the recorded incidents)."""
        self.ledger.close_open_incidents(run.id, outcome="resolved", reason="supervisor restarted", action="restart")
        self.ledger.event(run.id, "supervisor", "adopted", {"state": run.state, "detached": self.detached},
                          "re-attaching to the live workers" if self.detached
                          else "restarting current stage from newest good checkpoint")
        if run.state == RunState.RECOVERING:
            self.ledger.set_state(run.id, RunState.RUNNING, actor="supervisor", reason="supervisor restarted")
        self._spawn(run.id, parse_pipeline(json.loads(run.spec)), start_paused=run.state == RunState.PAUSED,
                    reattach=self.detached)

    def shutdown(self) -> None:
        for d in list(self.drivers.values()):
            d.halt()
        for d in list(self.drivers.values()):
            d.join(timeout=30)
        self.source.close()
        if self.annotator is not None:
            self.annotator.close()

    def ready(self) -> bool:
        return self._started

    def _spawn(self, run_id: str, spec: PipelineSpec, *, start_paused: bool = False, reattach: bool = False) -> None:
        self.goodput.started(run_id)
        d = RunDriver(self.parts, run_id, spec, start_paused=start_paused, reattach=reattach)
        with self._drivers_lock:
            self.drivers[run_id] = d
        d.start()

    def _driver_done(self, run_id: str) -> None:
        with self._drivers_lock:
            self.drivers.pop(run_id, None)

    def _running_stages(self) -> list[tuple[str, ActiveStage]]:
        with self._drivers_lock:
            drivers = list(self.drivers.values())
        return [(d.run_id, a) for d in drivers if (a := d.running_stage()) is not None]

    def request_restart(self, run_id: str, *, checkpoint: str | None, incident: int) -> bool:
        """The executor's way to a new worker group (GroupRestarter)."""
        driver = self.drivers.get(run_id)
        if driver is None:
            return False
        driver.request_restart(checkpoint=checkpoint, incident=incident)
        return True

    # ---- scheduler jobs ----------------------------------------------------------------------
    def watch_once(self, now: float | None = None, *, run_ids: list[str] | None = None) -> None:
        self.watch.once(now, run_ids=run_ids)
        if self.executor.approval_timeout is not None:  # auto-apply is on: look for proposals due
            self.apply_due_proposals()

    def checkpoints_once(self, run_ids: list[str] | None = None) -> None:
        with self._drivers_lock:
            ids = [r for r in self.drivers if run_ids is None or r in run_ids]
        self.catalog.scan(ids)

    def goodput_of(self, run_id: str) -> float | None:
        d = self.drivers.get(run_id)
        active = d.active if d else None
        return self.goodput.ratio(run_id, active.productive_seconds() if active else 0.0)

    def _publish_goodput(self, run_id: str) -> None:
        self.goodput_once(run_ids=[run_id])

    def goodput_once(self, run_ids: list[str] | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        with self._drivers_lock:
            ids = [r for r in self.drivers if run_ids is None or r in run_ids]
        for run_id in ids:
            ratio = self.goodput_of(run_id)
            if ratio is not None:
                out[run_id] = ratio
                self.metrics.goodput.labels(run=run_id).set(ratio)
                self.ledger.update_run(run_id, goodput=ratio)
        return out

    # ---- operator control (ControllerPort) ---------------------------------------------------
    def submit(self, spec: PipelineSpec, *, actor: str, recovery_mode: str | None = None) -> str:
        """`recovery_mode`: auto, approve or observe (None: the deployment's TRAINGUARD_RECOVERY_MODE)."""
        mode = RecoveryMode(recovery_mode or getattr(self.settings, "recovery_mode", "auto")).value
        self.check_user_code(spec)
        run_id = self.ledger.create_run(name=spec.name, spec_json=spec.model_dump_json(), actor=actor,
                                        recovery_mode=mode)
        self.metrics.set_state(run_id, RunState.PENDING.value)
        self._spawn(run_id, spec)
        return run_id

    def check_user_code(self, spec: PipelineSpec) -> None:
        """Refuse (InvalidRequest naming `stages.N.entrypoint`) a custom or loop stage whose
        entrypoint is outside the deployment's allow-list, or cannot be imported, or is not a
        stage class / loop function. The import happens in a Ray task of its own process
        (workers/usercode.py): this process never imports user code."""
        entries: list[tuple[str, str, str]] = []
        for i, st in enumerate(spec.stages):
            if isinstance(st, (CustomStage, LoopStage)):
                where = f"stages.{i}.entrypoint"
                refusal = entrypoint_refusal(st.entrypoint, self.user_code)
                if refusal is not None:
                    raise errors.InvalidRequest(f"{where}: {refusal}")
                entries.append((where, st.kind, st.entrypoint))
        if not entries:
            return
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        if not ray.is_initialized():
            raise errors.Unavailable("the supervisor's Ray is not started; user code cannot be checked")
        ref = check_entrypoints_remote().remote(entries, self.user_code.to_dict())
        try:
            found = ray.get(ref, timeout=USER_CODE_CHECK_TIMEOUT_S)
        except GetTimeoutError:
            ray.cancel(ref, force=True)
            raise errors.Unavailable(f"checking the entrypoints took over {USER_CODE_CHECK_TIMEOUT_S:.0f} s "
                                     f"(a module that does work on import?); try again") from None
        except RayError as e:
            raise errors.Unavailable(f"the entrypoint check could not run: {type(e).__name__}") from None
        for where, error in sorted(found.items()):
            raise errors.InvalidRequest(f"{where}: {error}")

    def _require(self, run_id: str, what: str, states: tuple[RunState, ...]) -> tuple[Any, RunDriver | None]:
        run = self.ledger.run(run_id)
        if run.state not in states:
            raise errors.Conflict(f"cannot {what} run {run_id} in state {run.state!r}")
        return run, self.drivers.get(run_id)

    def _control(self, run_id: str, kind: ControlKind, payload: dict[str, Any]) -> ActiveStage:
        driver = self.drivers.get(run_id)
        active = driver.running_stage() if driver else None
        if active is None:
            raise errors.Conflict(f"run {run_id} has no running workers")
        active.group.control(kind, payload)
        return active

    def pause(self, run_id: str, *, actor: str) -> None:
        with self.lock(run_id):
            self._require(run_id, "pause", (RunState.RUNNING, RunState.RECOVERING, RunState.PENDING))
            self._control(run_id, ControlKind.PAUSE, {})
            self.ledger.set_state(run_id, RunState.PAUSED, actor=actor, reason="operator pause")

    def resume(self, run_id: str, *, actor: str) -> None:
        with self.lock(run_id):
            run, driver = self._require(run_id, "resume", (RunState.PAUSED, RunState.NEEDS_ATTENTION))
            if run.state == RunState.NEEDS_ATTENTION and driver is None:
                self.ledger.set_state(run_id, RunState.RUNNING, actor=actor, reason="operator resume after needs_attention")
                self._spawn(run_id, parse_pipeline(json.loads(run.spec)))
                return
            self._control(run_id, ControlKind.RESUME, {}).resumed_at = time.time()
            self.ledger.set_state(run_id, RunState.RUNNING, actor=actor, reason="operator resume")

    def stop(self, run_id: str, *, actor: str) -> None:
        """Stopped means stopped, whatever the run was doing: the workers write a last checkpoint
        when they can (a running or paused group gets STOP), the driver ends the stage and kills
        every actor of the run, and every stage row ends final."""
        with self.lock(run_id):
            _, driver = self._require(run_id, "stop", (RunState.PENDING, RunState.RUNNING, RunState.PAUSED, RunState.RECOVERING, RunState.NEEDS_ATTENTION))
            self.ledger.set_state(run_id, RunState.STOPPED, actor=actor, reason="operator stop")
            if driver is not None and driver.active is not None:
                driver.active.pending = None  # a recovery in flight is abandoned, not resumed
            try:
                self._control(run_id, ControlKind.STOP, {})
                if driver is not None:
                    driver.request_stop()
            except errors.Conflict:  # no group now (starting, restarting): nothing to wait for
                if driver is not None:
                    driver.halt()
            self.ledger.close_open_incidents(run_id, outcome="ignored", reason="run stopped")
            for prop in self.ledger.waiting_proposals(run_id):
                self._expire(run_id, prop, "the run was stopped")
            if driver is None:
                self.ledger.close_stages(run_id)

    def anneal(self, run_id: str, *, steps: int, final_lr: float, schedule: str,
               mixture: dict[str, float] | None, actor: str) -> None:
        with self.lock(run_id):
            run, _ = self._require(run_id, "anneal", (RunState.RUNNING, RunState.PAUSED, RunState.RECOVERING))
            if mixture:
                known = {"web", "curated", *parse_pipeline(json.loads(run.spec)).data}
                unknown = sorted(set(mixture) - known)
                if unknown:
                    raise errors.InvalidRequest(f"mixture names unknown source(s) {unknown} (known: {sorted(known)})")
            payload = {"steps": steps, "final_lr": final_lr, "schedule": schedule, "mixture": mixture}
            self._control(run_id, ControlKind.ANNEAL, payload)
            self.ledger.event(run_id, actor, "anneal", payload, "sent")

    def rollback(self, run_id: str, *, checkpoint_id: int | None, actor: str, skip: bool = True,
                 lr_multiplier: float | None = None) -> dict[str, Any]:
        """Roll back to `checkpoint_id` (or the newest good checkpoint). `skip`: never train on the
        batches since that checkpoint again; `lr_multiplier`: factor on the LR in effect at the
        checkpoint (None: the recovery policy's backoff)."""
        with self.lock(run_id):
            run, driver = self._require(run_id, "roll back", (RunState.RUNNING, RunState.PAUSED, RunState.RECOVERING, RunState.NEEDS_ATTENTION))
            active = driver.active if driver else None
            if active is None:
                raise errors.Conflict(f"run {run_id} has no running stage to roll back")
            wanted_step = self._usable_checkpoint_step(run_id, active, checkpoint_id)
            finding = Finding(OPERATOR_ROLLBACK, max(active.last_step, 0), max(active.last_step, 0),
                              {"requested_checkpoint": checkpoint_id, "requested_checkpoint_step": wanted_step,
                               "by": actor, "skip": bool(skip), "lr_multiplier": lr_multiplier})
            if run.state in (RunState.PAUSED, RunState.NEEDS_ATTENTION) and active.group is not None:
                active.group.control(ControlKind.RESUME, {})
                active.resumed_at = time.time()
            active.pending = None
            handled = self.executor.handle(run_id, active, finding, source="operator", actor=actor)
            assert handled.incident is not None
            inc = self.ledger.incident(handled.incident)
            assert inc is not None
            return {"incident": inc.id, "action": inc.action, "rollback_to_step": inc.rollback_to_step}

    def _usable_checkpoint_step(self, run_id: str, active: ActiveStage, checkpoint_id: int | None) -> int | None:
        """The step of the checkpoint an operator named, once it is known to be usable right now."""
        if checkpoint_id is None:
            return None
        ckpt = self.ledger.checkpoint(run_id, checkpoint_id)
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
        if not self.catalog.verified_now(run_id, ckpt.path, ckpt.stage_name):
            raise errors.Conflict(f"checkpoint {checkpoint_id} no longer holds the bytes its worker wrote "
                                  f"(deleted, replaced or corrupt); nothing was changed")
        return int(ckpt.step)

    # ---- recovery proposals (approve / observe modes) -----------------------------------------
    def approve_proposal(self, run_id: str, proposal_id: int, *, actor: str, note: str | None = None) -> dict[str, Any]:
        """Carry out a waiting proposal exactly as recorded (same checkpoint, skip ranges, LR).
        Refused (Conflict, nothing changed) when it was decided already, was made in observe
        mode, or no longer applies (run ended, stage over, another recovery since, checkpoint
        gone or changed): such a proposal is marked expired."""
        with self.lock(run_id):
            prop = self._waiting(run_id, proposal_id, "approve")
            if prop.mode == RecoveryMode.OBSERVE:
                raise errors.Conflict(f"proposal {proposal_id} was made in observe mode, which never acts; "
                                      f"roll back by hand (POST /runs/{run_id}/rollback) to act on it")
            run = self.ledger.run(run_id)
            why = self._inapplicable(run, prop)
            if why is not None:
                self._expire(run_id, prop, why)
                raise errors.Conflict(f"proposal {proposal_id} can no longer be carried out: {why}; "
                                      f"it is now expired and nothing was changed")
            driver = self.drivers.get(run_id)
            active = driver.active if driver else None
            if active is None:  # the driver ended just now
                self._expire(run_id, prop, "the run has no running stage")
                raise errors.Conflict(f"proposal {proposal_id} can no longer be carried out: the run has no running "
                                      f"stage; it is now expired and nothing was changed")
            if (prop.action == Action.ROLLBACK and run.state in (RunState.PAUSED, RunState.NEEDS_ATTENTION)
                    and active.group is not None):
                try:  # as an operator rollback does: the held workers take the rollback at their next step
                    active.group.control(ControlKind.RESUME, {})
                    active.resumed_at = time.time()
                except Exception as e:  # noqa: BLE001 - a dead group: the rollback becomes a restart
                    log.warning("resume before the approved rollback failed: %s", e)
            self.executor.carry_out_proposal(run_id, active, prop, actor=actor)
            prop = self.ledger.update_proposal(run_id, proposal_id, state=ProposalState.APPROVED.value,
                                               decided_at=self.ledger.now(), decided_by=actor, note=note)
            self._note_on_incident(prop, f"proposal {proposal_id} approved by {actor}")
            self.ledger.event(run_id, actor, "proposal_approved",
                              {"proposal": proposal_id, "incident": prop.incident_id, "action": prop.action,
                               "checkpoint_step": prop.checkpoint_step, "skip": prop.skip,
                               "lr_target": prop.lr_target, "note": note}, "carried out")
            self.executor.announce(prop, ProposalState.APPROVED.value)
            return self._proposal_result(prop)

    def reject_proposal(self, run_id: str, proposal_id: int, *, actor: str, note: str | None = None) -> dict[str, Any]:
        """Decline a waiting proposal: nothing is carried out and the run stays as it is (a run
        approve mode held stays needs_attention until an operator resumes, rolls back or stops it)."""
        with self.lock(run_id):
            self._waiting(run_id, proposal_id, "reject")
            prop = self.ledger.update_proposal(run_id, proposal_id, state=ProposalState.REJECTED.value,
                                               decided_at=self.ledger.now(), decided_by=actor, note=note)
            self._close_incident(prop, f"proposal {proposal_id} rejected by {actor}")
            self.ledger.event(run_id, actor, "proposal_rejected",
                              {"proposal": proposal_id, "incident": prop.incident_id, "action": prop.action,
                               "note": note}, "nothing changed")
            self.executor.announce(prop, ProposalState.REJECTED.value)
            return self._proposal_result(prop)

    def apply_due_proposals(self) -> int:
        """Approve mode with TRAINGUARD_APPROVAL_TIMEOUT: carry out the proposals nobody decided
        on in time (actor "auto-apply"). Returns how many were carried out."""
        done = 0
        for prop in self.ledger.due_proposals():
            try:
                self.approve_proposal(prop.run_id, int(prop.id or 0), actor="auto-apply",
                                      note="no operator decided before the approval timeout")
                done += 1
            except (errors.Conflict, errors.NotFound) as e:
                log.info("auto-apply of proposal %s of %s: %s", prop.id, prop.run_id, e)
        return done

    def _waiting(self, run_id: str, proposal_id: int, what: str) -> Proposal:
        prop = self.ledger.proposal(run_id, proposal_id)
        if prop.state != ProposalState.PROPOSED:
            by = f" by {prop.decided_by}" if prop.decided_by else ""
            raise errors.Conflict(f"cannot {what} proposal {proposal_id}: it is {prop.state} already{by}"
                                  + (f" ({prop.note})" if prop.note else ""))
        return prop

    def _inapplicable(self, run: Any, prop: Proposal) -> str | None:
        """Why the proposal cannot be carried out now (None: it can)."""
        if RunState(run.state) in TERMINAL_RUN_STATES:
            return f"the run is {run.state}"
        if run.state == RunState.PENDING:
            return "the run has not started"
        driver = self.drivers.get(run.id)
        active = driver.active if driver else None
        if active is None:
            return "the run has no running stage"
        if active.name != prop.stage_name:
            return f"the run moved on to stage {active.name!r}"
        if active.pending is not None:
            return f"another recovery (incident {active.pending.incident}) is in flight"
        later = [i for i in self.ledger.stage_incidents(run.id, prop.stage_name)
                 if (i.id or 0) > (prop.incident_id or 0) and i.action in (Action.ROLLBACK.value, Action.RESTART.value)]
        if later:
            return f"the run moved on: incident {later[0].id} was recovered since"
        if prop.checkpoint_ref:
            if prop.checkpoint_id is None:
                return f"its checkpoint (step {prop.checkpoint_step}) is not in the store"
            try:  # the checks an operator's rollback to a named checkpoint gets
                self._usable_checkpoint_step(run.id, active, prop.checkpoint_id)
            except (errors.Conflict, errors.NotFound) as e:
                return f"its checkpoint (step {prop.checkpoint_step}) cannot be used: {e}"
        return None

    def _expire(self, run_id: str, prop: Proposal, why: str) -> None:
        prop = self.ledger.update_proposal(run_id, int(prop.id or 0), state=ProposalState.EXPIRED.value,
                                           decided_at=self.ledger.now(), decided_by="supervisor", note=why)
        self._close_incident(prop, f"proposal {prop.id} expired: {why}")
        self.ledger.event(run_id, "supervisor", "proposal_expired", {"proposal": prop.id, "reason": why}, "ok")
        self.executor.announce(prop, ProposalState.EXPIRED.value)

    def _note_on_incident(self, prop: Proposal, note: str) -> None:
        inc = self.ledger.incident(prop.incident_id) if prop.incident_id is not None else None
        if inc is not None:
            self.ledger.update_incident(int(prop.incident_id or 0), evidence={**(inc.evidence or {}), "decided": note})

    def _close_incident(self, prop: Proposal, note: str) -> None:
        """The proposal's incident, if still open, closes without any recovery (outcome ignored)."""
        inc = self.ledger.incident(prop.incident_id) if prop.incident_id is not None else None
        if inc is None:
            return
        fields: dict[str, Any] = {"evidence": {**(inc.evidence or {}), "decided": note}}
        if inc.outcome == "open":
            fields["outcome"] = "ignored"
        self.ledger.update_incident(int(prop.incident_id or 0), **fields)

    def _proposal_result(self, prop: Proposal) -> dict[str, Any]:
        return {"proposal": prop.id, "state": prop.state, "incident": prop.incident_id, "action": prop.action,
                "rollback_to_step": prop.checkpoint_step, "run_state": self.ledger.run_state(prop.run_id).value}

    def _annotate(self, text: str, tags: list[str]) -> None:
        """A Grafana annotation from a run driver (e.g. a change of world size), when a Grafana is configured."""
        if self.annotator is not None:
            self.annotator.post(text=text, tags=tags)

    def _proposal_event(self, prop: Proposal, what: str) -> None:
        """Every proposal event becomes a Grafana annotation (when a Grafana is configured)."""
        if self.annotator is None:
            return
        from trainguard.service.adapters.grafana import annotation_tags

        target = (f" to checkpoint {prop.checkpoint_step}" if prop.action == Action.ROLLBACK.value
                  and prop.checkpoint_step is not None else "")
        by = f" by {prop.decided_by}" if prop.decided_by and what != ProposalState.PROPOSED else ""
        text = (f"recovery proposal {prop.id} {what}{by}: {prop.action}{target} for {prop.kind} "
                f"({prop.mode} mode) — {prop.reason}")
        self.annotator.post(text=text, tags=annotation_tags("proposal", run=prop.run_id, stage=prop.stage_name,
                                                             kind=prop.kind, state=what))

    def handle_alerts(self, payload: Any, *, actor: str = "alertmanager") -> dict[str, int]:
        return self.watch.alerts(payload, lambda run_id: d.active if (d := self.drivers.get(run_id)) else None,
                                 actor=actor)

    # ---- discovery, metrics ------------------------------------------------------------------
    def sd_targets(self) -> list[dict[str, Any]]:
        groups = [{"targets": [f"{self.settings.host}:{self.settings.port}"],
                   "labels": {"job": "trainguard-supervisor", "component": "supervisor"}}]
        for _, active in self._running_stages():
            for t in active.targets:
                groups.append({"targets": [t.address], "labels": {"job": "trainguard-workers", "run": t.run,
                                                                   "stage": t.stage, "rank": str(t.rank)}})
        return groups

    def metrics_text(self) -> bytes:
        return self.metrics.text()


def _grafana_annotator(settings: Any) -> Any:
    """A background annotator when TRAINGUARD_GRAFANA_URL and TRAINGUARD_GRAFANA_TOKEN are set
    (grafana-client loads only then); None otherwise."""
    url, token = getattr(settings, "grafana_url", None), getattr(settings, "grafana_token", None)
    if not url or token is None or not token.get_secret_value():
        return None
    from trainguard.service.adapters.grafana import BackgroundAnnotator, GrafanaClient

    return BackgroundAnnotator(GrafanaClient(url, token.get_secret_value()))
