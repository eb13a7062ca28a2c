"""job webhooks

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 03:40:48.232970
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("callback_url", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("webhook_sent_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("webhook_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("webhook_error")
        batch_op.drop_column("webhook_sent_at")
        batch_op.drop_column("callback_url")
