"""Shared fixtures: one Ray instance per test session, free ports, CI-strict skips."""
from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.markers import require_folder_markers
from tests.s3server import configure_environment

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The S3 test server's address and credentials, set before anything starts Ray or imports
# workers/group.py (see tests/s3server.py); the server starts with the `s3_server` fixture.
configure_environment()


@pytest.hookimpl(tryfirst=True)  # before `-m`/`-k` deselect anything
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test under tests/integration, tests/e2e or tests/bench without its folder's marker
    fails the session: it would otherwise run in the fast tier (README, "Tests and benchmarks")."""
    require_folder_markers(items, Path(__file__).parent)


def require(condition: bool, why: str) -> None:
    """Skip locally when a component is missing; in CI a missing component fails the test."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required component missing in CI: {why}")
    pytest.skip(why)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"binary {name!r} not on PATH")
    return path  # type: ignore[return-value]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "condition",
             detail: Callable[[], str] | None = None):
    """Poll `cond` until it returns a truthy value; fail with `what` (and `detail()`, for the
    diagnostics worth reading then) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - report the last one if we time out
            last_exc = e
        time.sleep(interval)
    extra = ""
    if detail is not None:
        try:
            extra = "\n" + detail()
        except Exception as e:  # noqa: BLE001
            extra = f"\n(diagnostics unavailable: {e!r})"
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_exc!r})" if last_exc else "") + extra)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (starting one takes ~7 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=8,  # logical slots: actors use num_cpus=0 anyway; 2 physical cores here
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"PYTHONHASHSEED": "0"}},
        )
    yield ray
    # Ray is shut down at interpreter exit; other session fixtures may still need it.


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server, one process per session (tests/s3server.py). Locally a
    server that cannot start skips the test; in CI it fails it."""
    from tests.s3server import start_server

    try:
        server = start_server()
    except Exception as e:  # noqa: BLE001 - moto missing, port taken, server crashed
        require(False, f"S3 test server (moto) could not start: {e}")
    yield server
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except Exception:  # noqa: BLE001
        server.process.kill()


@pytest.fixture
def tmp_state(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


POSTGRES_URL = os.environ.get("TRAINGUARD_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path) -> str:
    """Store tests run on both SQLite and PostgreSQL (a fresh schema per test on PostgreSQL)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'trainguard.db'}"
        return
    import sqlalchemy as sa

    try:
        eng = sa.create_engine(POSTGRES_URL)
        with eng.connect() as c:
            c.execute(sa.text("select 1"))
    except Exception as e:  # noqa: BLE001
        require(False, f"PostgreSQL at {POSTGRES_URL} unreachable: {e}")
    schema = f"tg_{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**8}"
    with eng.begin() as c:
        c.execute(sa.text(f'drop schema if exists "{schema}" cascade'))
        c.execute(sa.text(f'create schema "{schema}"'))
    url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    yield url
    with eng.begin() as c:
        c.execute(sa.text(f'drop schema if exists "{schema}" cascade'))
    eng.dispose()
