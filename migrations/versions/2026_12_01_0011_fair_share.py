"""fair share: jobs released to the broker chunk by chunk, tenants' weights

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 11:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("chunks", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
        batch_op.add_column(
            sa.Column("released", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
    # Jobs stored before this revision had every chunk sent at submit.
    op.execute(
        "UPDATE jobs SET chunks = (SELECT COALESCE(MAX(items.chunk) + 1, 0) FROM items"
        " WHERE items.job_id = jobs.id)"
    )
    op.execute("UPDATE jobs SET released = chunks")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("weight", sa.Integer(), nullable=False, server_default=sa.text("1"))
        )
    # Workers pull only from released chunks: the chunk leads, so the bound is an index range.
    op.drop_index("ix_items_pending", table_name="items")
    op.create_index(
        "ix_items_pending",
        "items",
        ["job_id", "chunk", "index"],
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_items_pending", table_name="items")
    op.create_index(
        "ix_items_pending",
        "items",
        ["job_id", "index"],
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("weight")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("released")
        batch_op.drop_column("chunks")
