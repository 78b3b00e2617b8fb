"""checkpoint trust and live stage progress: checkpoint.files, checkpoint.deleted_at,
run_stage.last_loss, run_stage.last_step_at

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

`checkpoint.files` holds the sha256 of every file as the worker reported it when it wrote
the checkpoint (the trust anchor; the manifest inside the folder is not trusted).
`deleted_at` marks a checkpoint retention or a rollback removed: gone, not corrupt.
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("checkpoint") as b:
        b.add_column(sa.Column("files", sa.JSON(), nullable=False, server_default="{}"))
        b.add_column(sa.Column("deleted_at", TZ, nullable=True))
    with op.batch_alter_table("run_stage") as b:
        b.add_column(sa.Column("last_loss", sa.Float(), nullable=True))
        b.add_column(sa.Column("last_step_at", TZ, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run_stage") as b:
        b.drop_column("last_step_at")
        b.drop_column("last_loss")
    with op.batch_alter_table("checkpoint") as b:
        b.drop_column("deleted_at")
        b.drop_column("files")
