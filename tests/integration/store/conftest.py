from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlmodel import Session

from service.db import init_db, make_engine
from tests.conftest import POSTGRES_URL, require


# Overrides tests/conftest.py's `database_url`, whose SQLite branch `return`s from a
# generator fixture ("did not yield a value"). Same parameters and behaviour; drop this
# once the shared fixture yields in both branches.
@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path):
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
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with eng.begin() as c:
        c.execute(sa.text(f'drop schema if exists "{schema}" cascade'))
    eng.dispose()


@pytest.fixture
def engine(database_url):
    eng = init_db(make_engine(database_url))
    yield eng
    eng.dispose()


@pytest.fixture
def session(engine):
    with Session(engine) as s:
        yield s
