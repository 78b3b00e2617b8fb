"""Alembic owns the schema: `upgrade head` on an empty database yields exactly the models."""
from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel

from trainguard.service.db import init_db, make_engine
from trainguard.service.db import models  # noqa: F401
from trainguard.service.db.engine import alembic_config

pytestmark = pytest.mark.integration

TABLES = {"run", "run_stage", "checkpoint", "incident", "event", "proposal", "run_list_version"}


def test_upgrade_head_on_empty_db_creates_the_models_tables(database_url):
    engine = init_db(make_engine(database_url))
    try:
        names = set(sa.inspect(engine).get_table_names())
        assert names == TABLES | {"alembic_version"}
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        with engine.connect() as c:
            assert MigrationContext.configure(c).get_current_revision() == head
    finally:
        engine.dispose()


def test_autogenerate_finds_no_difference_between_migrations_and_models(database_url):
    engine = init_db(make_engine(database_url))
    try:
        with engine.connect() as c:
            diff = compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), SQLModel.metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_init_db_twice_is_a_no_op_and_downgrade_removes_everything(database_url):
    engine = make_engine(database_url)
    try:
        init_db(engine)
        init_db(engine)
        cfg = alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        assert set(sa.inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()


def test_alembic_cli_path_uses_the_url_option(database_url):
    """What `alembic -x ... upgrade head` does: no connection passed in, URL from the config."""
    command.upgrade(alembic_config(database_url), "head")
    engine = make_engine(database_url)
    try:
        assert TABLES <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
