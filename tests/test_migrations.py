"""The Alembic migrations and the SQLAlchemy models describe the same schema."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from gemma_batch.store.sessions import get_sql_engine
from gemma_batch.store.tables import Base


def test_migrations_match_the_models(database_url: str) -> None:
    with get_sql_engine().connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() is not None
