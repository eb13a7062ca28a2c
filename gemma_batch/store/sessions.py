"""The SQL connection of a process: one SQLAlchemy engine, built from the settings, and sessions."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from gemma_batch.settings import get_settings


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes; busy_timeout makes writers wait, not fail.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def sql_engine(url: str, application_name: str = "gemma-batch") -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _on_sqlite_connect)
        return engine
    connect_args = {}
    if parsed.get_backend_name() == "postgresql":
        connect_args["application_name"] = application_name
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


@lru_cache
def get_sql_engine() -> Engine:
    # Named after the process (api, worker, cli) so PostgreSQL's pg_stat_activity tells them apart.
    return sql_engine(get_settings().database_url, f"gemma-batch {Path(sys.argv[0]).name}")


@lru_cache
def _session_factory() -> sessionmaker[Session]:
    return sessionmaker(get_sql_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that is closed on exit; callers commit where their unit of work ends."""
    with _session_factory()() as session:
        yield session


def reset_sql_engine() -> None:
    """Forget the engine (after a fork, or when tests change the settings)."""
    if get_sql_engine.cache_info().currsize:
        get_sql_engine().dispose(close=False)
    get_sql_engine.cache_clear()
    _session_factory.cache_clear()
