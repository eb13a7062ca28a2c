"""Fuzzing the API from its own OpenAPI document: no request, however odd, gets a 5xx.

schemathesis generates requests for every operation (valid and invalid bodies, parameters and
headers) and sends them to the FastAPI app in-process, on a SQLite database of this module's own,
with a valid API key. The example count is bounded so the run fits in CI (about a minute).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from api.main import app
from gemma_batch.settings import get_settings
from gemma_batch.store.sessions import get_sql_engine
from tests.faults.conftest import auth_headers

EXAMPLES = 25  # per operation

# The schema is the app's own document; requests go to the app in-process (ASGI). The app
# reads its settings and database per request, so the fixtures below decide where they go.
schema = schemathesis.openapi.from_dict(app.openapi())
schema.app = app


@pytest.fixture(scope="module")
def fuzz_database(sqlite_url: str, model_dir: Path) -> Iterator[str]:
    """This module's SQLite database, with the tiny model prepared; the app's lifespan ends here."""
    # A synchronous completion that got through would wait for a worker; none runs here.
    os.environ["GEMMA_BATCH_SYNC_TIMEOUT"] = "2"
    get_settings.cache_clear()
    try:
        yield sqlite_url
    finally:
        from schemathesis.python import asgi

        asgi.shutdown_lifespans()  # the app's background loops (webhooks, sweeps)
        del os.environ["GEMMA_BATCH_SYNC_TIMEOUT"]
        get_settings.cache_clear()


@pytest.fixture(scope="module")
def api_headers(fuzz_database: str) -> dict[str, str]:
    return auth_headers(get_sql_engine())


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_request_gets_a_server_error(case: Any, api_headers: dict[str, str]) -> None:
    case.call_and_validate(headers=api_headers, checks=[not_a_server_error])
