"""labelling columns

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 02:43:10.464437
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fields", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("label", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("label_probs", sa.JSON(), nullable=True))

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("template", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("prefix", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column("chat", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(sa.Column("choices", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("json_schema", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("columns", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("columns")
        batch_op.drop_column("json_schema")
        batch_op.drop_column("choices")
        batch_op.drop_column("chat")
        batch_op.drop_column("prefix")
        batch_op.drop_column("template")

    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_column("label_probs")
        batch_op.drop_column("label")
        batch_op.drop_column("fields")
