"""run list indexes: GET /runs pages newest first, optionally by state

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07

Without an index SQLite sorts every run row (spec text included) to answer one page of
`ORDER BY created_at DESC, id DESC LIMIT n`: 5-9 ms at 1,000 runs, 0.5 ms with one.
"""
from __future__ import annotations

from typing import Sequence, Union

from alembic import op

revision: str = "0004"
down_revision: Union[str, None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index("ix_run_created_at_id", "run", ["created_at", "id"])
    op.create_index("ix_run_state_created_at_id", "run", ["state", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_run_state_created_at_id", table_name="run")
    op.drop_index("ix_run_created_at_id", table_name="run")
