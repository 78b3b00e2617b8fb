from __future__ import annotations

import pytest
from sqlmodel import Session

from trainguard.service.db import init_db, make_engine


@pytest.fixture
def engine(database_url):
    eng = init_db(make_engine(database_url))
    yield eng
    eng.dispose()


@pytest.fixture
def session(engine):
    with Session(engine) as s:
        yield s
