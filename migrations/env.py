"""Alembic environment: the same settings and table metadata as the application."""

from __future__ import annotations

from alembic import context

from gemma_batch.settings import get_settings
from gemma_batch.store.sessions import sql_engine
from gemma_batch.store.tables import Base


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:  # a caller (a test) hands in its own connection
        _run(connection)
        return
    engine = sql_engine(get_settings().database_url, "gemma-batch migrate")
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


def _run(connection: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite alters tables by copying them; batch mode does that for us.
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
