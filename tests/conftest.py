"""Shared fixtures: real Redis, real SQLite and PostgreSQL, a tiny real-architecture Gemma.

The environment is set before any project module is imported, because the Celery app and the
settings are built from it at import time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_ROOT = Path(tempfile.mkdtemp(prefix="gemma-batch-tests-"))
REAL_MODEL_DIR = Path(
    os.environ.get("GEMMA_BATCH_MODEL_DIR", Path.home() / ".cache" / "gemma-batch" / "models")
)
TEST_BROKER = os.environ.get("GEMMA_BATCH_TEST_BROKER_URL", "redis://127.0.0.1:6379/13")
TEST_POSTGRES = os.environ.get(
    "GEMMA_BATCH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
# Unique per run: a worker of another run (a leftover, or a run beside this one on the same
# broker) must never take this run's tasks, and queues are named after models.
RUN = uuid.uuid4().hex[:6]
TINY = f"tiny-gemma-{RUN}"
REAL = f"gemma-3-270m-{RUN}"

os.environ.update(
    {
        "GEMMA_BATCH_DATA_DIR": str(_ROOT / "data"),
        "GEMMA_BATCH_DATABASE_URL": f"sqlite:///{_ROOT / 'data' / 'main.db'}",
        "GEMMA_BATCH_BROKER_URL": TEST_BROKER,
        "GEMMA_BATCH_MODEL_DIR": str(_ROOT / "models"),
        "GEMMA_BATCH_MODEL": TINY,
        "GEMMA_BATCH_WORKER_METRICS_PORT": "0",
    }
)

from sqlalchemy import create_engine, text  # noqa: E402

from gemma_batch.cli.stack import LocalStack  # noqa: E402
from gemma_batch.settings import get_settings  # noqa: E402
from gemma_batch.store.sessions import reset_sql_engine  # noqa: E402
from tests.tiny_model import build_tiny_gemma  # noqa: E402


def wait_for(
    condition: Callable[[], Any], timeout: float, explain: Callable[[], str], pause: float = 0.2
) -> Any:
    """Poll until `condition()` is truthy and return it; fail with `explain()` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout:g} s: {explain()}")
        time.sleep(pause)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`gemma-batch ARGS` as a user runs it, in this environment (or `env`), wide enough that
    tables do not wrap."""
    return subprocess.run(
        [sys.executable, "-m", "gemma_batch", *args],
        env=(env or dict(os.environ)) | {"COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bearer(tenant: str) -> dict[str, str]:
    """Headers with a new API key for `tenant`, made in the current settings' database."""
    from api.auth import create_key
    from gemma_batch.store.sessions import session_scope

    with session_scope() as session:
        key = create_key(session, tenant).key
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session", autouse=True)
def _clean_broker() -> Iterator[None]:
    """Remove this run's queues afterwards; never flush: other runs may share the broker."""
    import redis

    yield
    client = redis.Redis.from_url(TEST_BROKER)
    for key in client.scan_iter(match=f"*{RUN}*"):
        client.delete(key)


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    path = REAL_MODEL_DIR / "gemma-3-270m"
    if not (path / "config.json").exists():
        pytest.fail("run `gemma-batch model prepare gemma-3-270m` first (make test does)")
    return REAL_MODEL_DIR


@pytest.fixture(scope="session")
def model_dir(real_model_dir: Path) -> Path:
    """The tests' model cache: the tiny model, and the real 270M linked in under this run's name."""
    cache = Path(os.environ["GEMMA_BATCH_MODEL_DIR"])
    build_tiny_gemma(real_model_dir / "gemma-3-270m", cache / TINY)
    (cache / REAL).symlink_to(real_model_dir / "gemma-3-270m")
    return cache


def _postgres_database() -> Iterator[str]:
    """A fresh database on the test PostgreSQL server, dropped afterwards."""
    from sqlalchemy.engine import make_url

    server = make_url(TEST_POSTGRES).set(drivername="postgresql+psycopg")
    name = f"gemma_batch_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def _sqlite_database() -> Iterator[str]:
    yield f"sqlite:///{_ROOT / 'data' / uuid.uuid4().hex}.db"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """An empty database of each kind, migrated to head, and made the current settings'."""
    make = _sqlite_database if request.param == "sqlite" else _postgres_database
    yield from _use_database(make)


@pytest.fixture(scope="module")
def sqlite_url() -> Iterator[str]:
    yield from _use_database(_sqlite_database)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    make = _sqlite_database if request.param == "sqlite" else _postgres_database
    yield from _use_database(make)


def _use_database(make) -> Iterator[str]:  # type: ignore[no-untyped-def]
    from gemma_batch.cli.admin import db_upgrade

    for url in make():
        previous = os.environ["GEMMA_BATCH_DATABASE_URL"]
        os.environ["GEMMA_BATCH_DATABASE_URL"] = url
        get_settings.cache_clear()
        reset_sql_engine()
        db_upgrade()
        try:
            yield url
        finally:
            reset_sql_engine()
            os.environ["GEMMA_BATCH_DATABASE_URL"] = previous
            get_settings.cache_clear()


@pytest.fixture(scope="module")
def stack_database(sqlite_url: str) -> str:
    """The database a module's stack runs on; a module overrides it to run on both kinds."""
    return sqlite_url


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    """Settings of a module's stack over the tests' own; a module overrides it to change them."""
    return {}


@pytest.fixture(scope="module")
def stack(
    stack_database: str,
    stack_env: dict[str, str],
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalStack]:
    """`gemma-batch api` and `gemma-batch worker` as child processes, one set per test module."""
    with LocalStack(stack_env, tmp_path_factory.mktemp("stack")) as running:
        yield running
