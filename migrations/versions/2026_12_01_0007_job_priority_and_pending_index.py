"""job priorities, and an index of the pending items that workers pull from

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 01:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("priority", sa.Integer(), nullable=False, server_default=sa.text("6"))
        )
    # Workers pull a job's pending items in index order; finished rows are left out of the index,
    # so a pull never walks past the done part of a big job.
    op.create_index(
        "ix_items_pending",
        "items",
        ["job_id", "index"],
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_items_pending", table_name="items")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("priority")
