"""One engine per process, built from the settings."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from gemma_batch.settings import get_settings

Row = TypeVar("Row")


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes; busy_timeout makes writers wait, not fail.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def build_engine(url: str, application_name: str = "gemma-batch") -> Engine:
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
def get_engine() -> Engine:
    # Named after the process (api, worker, cli) so PostgreSQL's pg_stat_activity tells them apart.
    return build_engine(get_settings().database_url, f"gemma-batch {Path(sys.argv[0]).name}")


@lru_cache
def _session_factory() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that is closed on exit; callers commit where their unit of work ends."""
    with _session_factory()() as session:
        yield session


def reset_engine() -> None:
    """Forget the engine (after a fork, or when tests change the settings)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)
    get_engine.cache_clear()
    _session_factory.cache_clear()


def newest_first(
    session: Session, model: type[Row], tenant: str, limit: int, after: str | None
) -> tuple[list[Row], bool]:
    """A page of the tenant's rows newest first (ids sort by creation); `after` is the previous
    page's last id.

    Also says whether more rows follow.
    """
    column = model.id  # type: ignore[attr-defined]
    owner = model.tenant  # type: ignore[attr-defined]
    query = select(model).where(owner == tenant).order_by(column.desc()).limit(limit + 1)
    if after:
        query = query.where(column < after)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit
