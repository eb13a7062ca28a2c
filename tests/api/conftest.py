"""An in-process API client on a fresh database of each kind, with small limits to test.

The client sends an API key of its own tenant, "tests".
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from gemma_batch.settings import get_settings
from tests.conftest import bearer


@pytest.fixture
def client(
    database_url: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    monkeypatch.setenv("GEMMA_BATCH_MAX_BODY_BYTES", "100000")
    monkeypatch.setenv("GEMMA_BATCH_MAX_ITEMS", "50")
    get_settings.cache_clear()
    with TestClient(create_app(), headers=bearer("tests")) as client:
        yield client
    get_settings.cache_clear()
