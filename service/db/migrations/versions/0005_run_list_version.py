"""run list version: a counter that every write to `run` bumps, for GET /runs' page cache

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07

GET /runs answers from a cache of serialised pages (service/api/routes/runs.py) that is valid
while `run_list_version` holds the same (epoch, version). Triggers on `run` add 1 to `version`
in the same transaction as every INSERT, UPDATE and DELETE (and TRUNCATE on PostgreSQL): the
bump cannot be forgotten by a code path, and it is visible exactly when the write is, to every
process sharing the store. `epoch` is a random token set here, so a store rebuilt under a
running API starts a version sequence that API has never seen.

SQLite's batch mode recreates a table to alter it, which drops its triggers: a later migration
that batch-alters `run` must create them again (tests/integration/store/test_run_list_version.py
checks that every write path still bumps the version at head).
"""
from __future__ import annotations

import secrets
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: Union[str, None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

BUMP = "UPDATE run_list_version SET version = version + 1 WHERE id = 1"
SQLITE_TRIGGERS = {f"run_list_version_after_{event.lower()}": event for event in ("INSERT", "UPDATE", "DELETE")}


def upgrade() -> None:
    table = op.create_table(
        "run_list_version",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("epoch", sa.String(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(table, [{"id": 1, "epoch": secrets.token_hex(8), "version": 0}])
    if op.get_context().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION run_list_version_bump() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN {BUMP}; RETURN NULL; END $$"
        )
        # per statement: one bump per write statement, however many rows it touched
        op.execute(
            "CREATE TRIGGER run_list_version_bump AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON run "
            "FOR EACH STATEMENT EXECUTE FUNCTION run_list_version_bump()"
        )
    else:  # SQLite: row triggers only
        for name, event in SQLITE_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} AFTER {event} ON run FOR EACH ROW BEGIN {BUMP}; END")


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS run_list_version_bump ON run")
        op.execute("DROP FUNCTION IF EXISTS run_list_version_bump()")
    else:
        for name in SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_table("run_list_version")
