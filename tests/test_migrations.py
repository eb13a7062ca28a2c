"""The Alembic migrations and the SQLAlchemy models describe the same schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from api.openai.filestore import SqlFiles
from gemma_batch.cli.admin import db_upgrade
from gemma_batch.settings import get_settings
from gemma_batch.store.sessions import get_sql_engine, reset_sql_engine
from gemma_batch.store.tables import Base


def test_migrations_match_the_models(database_url: str) -> None:
    with get_sql_engine().connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() is not None


def test_files_kept_in_the_files_folder_move_into_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upgrading past 0012 copies each file the folder kept into file_blocks (the new default
    store), so files uploaded before the upgrade are still served."""
    folder = tmp_path / "files"
    folder.mkdir()
    contents = bytes(range(256)) * 5000  # a block and a bit
    (folder / "file-old").write_bytes(contents)
    monkeypatch.setenv("GEMMA_BATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'old.db'}")
    monkeypatch.setenv("GEMMA_BATCH_FILES_DIR", str(folder))
    get_settings.cache_clear()
    reset_sql_engine()
    try:
        db_upgrade("0011")
        with get_sql_engine().begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO files (id, tenant, purpose, filename, bytes, created_at) "
                    "VALUES ('file-old', 'acme', 'batch', 'old.jsonl', :size, CURRENT_TIMESTAMP)"
                ),
                {"size": len(contents)},
            )
        db_upgrade()
        assert b"".join(SqlFiles().blocks("file-old")) == contents
    finally:
        reset_sql_engine()
        get_settings.cache_clear()
