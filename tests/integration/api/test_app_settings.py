"""create_app options that need no real socket (httpx over ASGI): auth switches, self-migration."""
from __future__ import annotations

import asyncio

import httpx
import pytest
import sqlalchemy as sa

from trainguard.service.api import create_app
from tests.integration.api.conftest import VIEWER, RecordingControllerForApiTests, _settings

pytestmark = pytest.mark.integration


def _get(app, *paths: str, token: str | None = None) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", headers=headers) as c:
            return [await c.get(p) for p in paths]

    return asyncio.run(go())


def _app(tmp_path, **settings_kw):
    # no engine: create_app makes and migrates its own from settings.database_url
    return create_app(_settings(tmp_path, **settings_kw), RecordingControllerForApiTests(engine=None))


def test_without_an_engine_the_app_migrates_its_database(tmp_path):
    (r,) = _get(_app(tmp_path), "/api/v1/runs", token=VIEWER)
    assert r.json() == {"data": [], "count": 0}
    tables = set(sa.inspect(sa.create_engine(f"sqlite:///{tmp_path / 'api.db'}")).get_table_names())
    assert {"run", "run_stage", "checkpoint", "incident", "event", "alembic_version"} <= tables


def test_sd_can_be_opened_and_metrics_closed(tmp_path):
    app = _app(tmp_path, sd_requires_auth=False, metrics_requires_auth=True)
    sd, metrics = _get(app, "/api/v1/sd", "/metrics")
    assert (sd.status_code, metrics.status_code) == (200, 401)
    (metrics,) = _get(app, "/metrics", token=VIEWER)
    assert metrics.status_code == 200
