"""A real uvicorn server on a free port, over a controller that only records calls."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from sqlmodel import Session, SQLModel

from trainguard.service.api import create_app
from trainguard.service.config import Settings
from trainguard.service.db import crud, init_db, make_engine
from tests.conftest import free_port, wait_for

VIEWER, OPERATOR, WEBHOOK = "viewer-test-token-1234", "operator-test-token-1234", "webhook-test-token-1234"


@dataclass
class RecordingControllerForApiTests:
    """Stands in for service.controller.Controller: records every call.

    `submit` stores the run as the real controller does (crud.create_run), so the
    API can answer with it. Set `fail_with` to make the next control call raise."""

    engine: Any
    calls: list[tuple[str, tuple, dict]] = field(default_factory=list)
    fail_with: BaseException | None = None
    after_submit: Callable[[str], None] | None = None
    rollback_result: dict = field(default_factory=lambda: {"incident": 7, "action": "rollback", "rollback_to_step": 40})
    alert_counts: dict = field(default_factory=lambda: {"created": 1, "merged": 0, "resolved": 0, "ignored": 0})
    is_ready: bool = True

    def _record(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, args, kwargs))
        if self.fail_with is not None:
            exc, self.fail_with = self.fail_with, None
            raise exc

    def submit(self, spec, *, actor, recovery_mode=None):
        self._record("submit", spec, actor=actor, **({"recovery_mode": recovery_mode} if recovery_mode else {}))
        with Session(self.engine) as s:
            run_id = crud.create_run(s, name=spec.name, spec_json=spec.model_dump_json(), actor=actor,
                                     recovery_mode=recovery_mode or "auto").id
        if self.after_submit:
            self.after_submit(run_id)
        return run_id

    def pause(self, run_id, *, actor):
        self._record("pause", run_id, actor=actor)

    def resume(self, run_id, *, actor):
        self._record("resume", run_id, actor=actor)

    def stop(self, run_id, *, actor):
        self._record("stop", run_id, actor=actor)

    def anneal(self, run_id, *, steps, final_lr, schedule, mixture, actor):
        self._record("anneal", run_id, steps=steps, final_lr=final_lr, schedule=schedule, mixture=mixture, actor=actor)

    def rollback(self, run_id, *, checkpoint_id, actor, skip=True, lr_multiplier=None):
        self._record("rollback", run_id, checkpoint_id=checkpoint_id, skip=skip, lr_multiplier=lr_multiplier,
                     actor=actor)
        return dict(self.rollback_result)

    def approve_proposal(self, run_id, proposal_id, *, actor, note=None):
        self._record("approve_proposal", run_id, proposal_id, actor=actor, note=note)
        return {"proposal": proposal_id, "state": "approved"}

    def reject_proposal(self, run_id, proposal_id, *, actor, note=None):
        self._record("reject_proposal", run_id, proposal_id, actor=actor, note=note)
        return {"proposal": proposal_id, "state": "rejected"}

    def handle_alerts(self, payload, *, actor):
        self._record("handle_alerts", payload, actor=actor)
        return dict(self.alert_counts)

    def sd_targets(self):
        return [{"targets": ["127.0.0.1:1234"], "labels": {"run": "run-0123456789ab", "stage": "pretrain", "rank": "0"}}]

    def metrics_text(self):
        return b"# HELP trainguard_up test\n# TYPE trainguard_up gauge\ntrainguard_up 1.0\n"

    def ready(self):
        return self.is_ready


@dataclass
class LiveApi:
    url: str
    engine: Any
    controller: RecordingControllerForApiTests
    settings: Settings

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)

    def snapshot(self) -> dict[str, list]:
        """Every row of every table: compare before and after a rejected request."""
        with self.engine.connect() as c:
            return {t.name: [tuple(r) for r in c.execute(sa.select(t).order_by(*t.primary_key.columns))]
                    for t in SQLModel.metadata.sorted_tables}


# What this deployment lets pipelines touch (service/access.py): /data for data files (it need
# not exist: the answer must not depend on it), a local folder and a bucket prefix for checkpoints.
DATA_ROOT, BUCKET = "/data", "s3://tg-test-bucket/checkpoints"


def _settings(state: Path, **kw: Any) -> Settings:
    kw = {"allowed_data_roots": [DATA_ROOT], "allowed_storage": [str(state / "checkpoints"), BUCKET], **kw}
    return Settings(
        environment="development", state_dir=state, database_url=f"sqlite:///{state / 'api.db'}",
        viewer_token=VIEWER, operator_token=OPERATOR, webhook_token=WEBHOOK, **kw,
    )


def make_api(state: Path) -> tuple[Settings, Any, "RecordingControllerForApiTests", Any]:
    """(settings, migrated engine, recording controller, app) on a SQLite file under `state`."""
    settings = _settings(state)
    engine = init_db(make_engine(settings.database_url))
    controller = RecordingControllerForApiTests(engine)
    return settings, engine, controller, create_app(settings, controller, engine=engine)


@pytest.fixture(scope="module")
def live_api(tmp_path_factory) -> LiveApi:
    settings, engine, controller, app = make_api(tmp_path_factory.mktemp("api-state"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=20, what="uvicorn to start")
    yield LiveApi(url=f"http://127.0.0.1:{port}", engine=engine, controller=controller, settings=settings)
    server.should_exit = True
    thread.join(timeout=10)
    engine.dispose()


@pytest.fixture
def api(live_api: LiveApi) -> LiveApi:
    live_api.controller.calls.clear()
    live_api.controller.fail_with = None
    live_api.controller.after_submit = None
    live_api.controller.is_ready = True
    return live_api
