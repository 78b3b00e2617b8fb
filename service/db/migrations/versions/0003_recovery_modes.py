"""recovery modes: run.recovery_mode and the proposal table

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

`run.recovery_mode` is auto (act), approve (propose, act once an operator approves) or
observe (propose, never act). `proposal` holds each recovery a mode did not carry out on its
own: the policy's decision field for field and what became of it.
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("run") as b:
        b.add_column(sa.Column("recovery_mode", sa.String(), nullable=False, server_default="auto"))
    op.create_table(
        "proposal",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.String(), sa.ForeignKey("run.id"), nullable=False),
        sa.Column("stage_name", sa.String(), nullable=False),
        sa.Column("incident_id", sa.Integer(), nullable=True),
        sa.Column("mode", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("checkpoint_step", sa.Integer(), nullable=True),
        sa.Column("checkpoint_ref", sa.String(), nullable=True),
        sa.Column("checkpoint_id", sa.Integer(), nullable=True),
        sa.Column("skip", sa.JSON(), nullable=False),
        sa.Column("lr_multiplier", sa.Float(), nullable=False),
        sa.Column("lr_target", sa.Float(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(), nullable=True),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("at_step", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("proposed_at", TZ, nullable=False),
        sa.Column("auto_apply_at", TZ, nullable=True),
        sa.Column("decided_at", TZ, nullable=True),
        sa.Column("decided_by", sa.String(), nullable=True),
        sa.Column("note", sa.String(), nullable=True),
    )
    op.create_index("ix_proposal_run_id", "proposal", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_proposal_run_id", table_name="proposal")
    op.drop_table("proposal")
    with op.batch_alter_table("run") as b:
        b.drop_column("recovery_mode")
