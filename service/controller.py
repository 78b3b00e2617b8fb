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
from trainguard.service.domain.state import ACTIVE_RUN_STATES, RunState
from trainguard.service.supervisor.catalog import CheckpointCatalog
from trainguard.service.supervisor.driver import DriverParts, RunDriver
from trainguard.service.supervisor.executor import OPERATOR_ROLLBACK, RecoveryExecutor
from trainguard.service.supervisor.goodput import GoodputClock
from trainguard.service.supervisor.ingest import Watch
from trainguard.service.supervisor.ledger import Ledger
from trainguard.service.supervisor.stage import ActiveStage
from trainguard.service.telemetry import SupervisorMetrics
from trainguard.workers.contract import ControlKind
from trainguard.workers.spec import PipelineSpec, parse_pipeline

__all__ = ["Controller", "ActiveStage", "RunDriver"]

log = logging.getLogger(__name__)



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
        self.executor = RecoveryExecutor(self.ledger, self.catalog, self.metrics, self.watch_config, self)
        self.watch = Watch(self.ledger, self.executor, self.source, self.watch_config, self._running_stages,
                           detect=settings.watch_enabled)
        self.parts = DriverParts(ledger=self.ledger, catalog=self.catalog, executor=self.executor, watch=self.watch,
                                  goodput=self.goodput, state_dir=self.state_dir,
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

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                     log_to_driver=False, configure_logging=False, ignore_reinit_error=True)
        from trainguard.workers.group import warm_pool

        warm_pool().refill()  # spare workers import torch now, not when the first stage starts
        self._started = True
        for run in self.ledger.runs_in(ACTIVE_RUN_STATES):
            self._adopt(run)

    def _adopt(self, run: Any) -> None:
        """A run that was active under a previous supervisor process: its workers are gone with it.
        What was in flight is closed (the restart carries those decisions out: skip list and LR
        come from the recorded incidents); the current stage restarts from its newest good checkpoint."""
        self.ledger.close_open_incidents(run.id, outcome="resolved", reason="supervisor restarted", action="restart")
        self.ledger.event(run.id, "supervisor", "adopted", {"state": run.state},
                          "restarting current stage from newest good checkpoint")
        if run.state == RunState.RECOVERING:
            self.ledger.set_state(run.id, RunState.RUNNING, actor="supervisor", reason="supervisor restarted")
        self._spawn(run.id, parse_pipeline(json.loads(run.spec)), start_paused=run.state == RunState.PAUSED)

    def shutdown(self) -> None:
        for d in list(self.drivers.values()):
            d.halt()
        for d in list(self.drivers.values()):
            d.join(timeout=30)
        self.source.close()

    def ready(self) -> bool:
        return self._started

    def _spawn(self, run_id: str, spec: PipelineSpec, *, start_paused: bool = False) -> None:
        self.goodput.started(run_id)
        d = RunDriver(self.parts, run_id, spec, start_paused=start_paused)
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
    def submit(self, spec: PipelineSpec, *, actor: str) -> str:
        run_id = self.ledger.create_run(name=spec.name, spec_json=spec.model_dump_json(), actor=actor)
        self.metrics.set_state(run_id, RunState.PENDING.value)
        self._spawn(run_id, spec)
        return run_id

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
