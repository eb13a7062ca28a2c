"""webhook outbox, upload guards (body hashes, column types), leased-items index, logprobs

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 04:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("webhook_status", sa.String(length=16), nullable=True))
        batch_op.add_column(
            sa.Column("webhook_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("webhook_next_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("request_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("column_types", sa.JSON(), nullable=True))
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("logprobs", sa.JSON(), nullable=True))
    op.create_index(
        "ix_items_leased",
        "items",
        ["lease_until"],
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    # Webhooks of jobs made before the outbox: still owed where not yet sent.
    op.execute(
        "UPDATE jobs SET webhook_status = CASE WHEN webhook_sent_at IS NULL "
        "THEN 'pending' ELSE 'delivered' END WHERE callback_url IS NOT NULL"
    )


def downgrade() -> None:
    op.drop_index("ix_items_leased", table_name="items")
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_column("logprobs")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("column_types")
        batch_op.drop_column("request_hash")
        batch_op.drop_column("webhook_next_at")
        batch_op.drop_column("webhook_attempts")
        batch_op.drop_column("webhook_status")
