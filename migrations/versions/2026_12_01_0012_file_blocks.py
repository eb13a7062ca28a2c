"""file_blocks: file contents in the database, so every API process reaches them

Files kept until now in the files folder (GEMMA_BATCH_FILES_DIR) are copied in, unless the
settings keep the folder as the store (GEMMA_BATCH_FILES_URL=file:...).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 11:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gemma_batch.settings import get_settings

BLOCK = 1 << 20  # as api.openai.filestore reads and writes them

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "file_blocks",
        sa.Column("file_id", sa.String(length=40), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["file_id"],
            ["files.id"],
            name=op.f("fk_file_blocks_file_id_files"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("file_id", "seq", name=op.f("pk_file_blocks")),
    )
    settings = get_settings()
    if settings.files_url != "sql" or not settings.files_dir.is_dir():
        return
    connection = op.get_bind()
    blocks = sa.table(
        "file_blocks", sa.column("file_id"), sa.column("seq"), sa.column("data", sa.LargeBinary)
    )
    for (file_id,) in connection.execute(sa.text("SELECT id FROM files")):
        path = settings.files_dir / file_id
        if not path.is_file():
            continue
        with path.open("rb") as source:
            for seq, data in enumerate(iter(lambda: source.read(BLOCK), b"")):
                connection.execute(blocks.insert().values(file_id=file_id, seq=seq, data=data))


def downgrade() -> None:
    op.drop_table("file_blocks")
