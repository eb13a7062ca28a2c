"""An in-process API client on a fresh database of each kind, with small limits to test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from gemma_batch.settings import get_settings


@pytest.fixture
def client(
    database_url: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    monkeypatch.setenv("GEMMA_BATCH_MAX_BODY_BYTES", "100000")
    monkeypatch.setenv("GEMMA_BATCH_MAX_ITEMS", "50")
    get_settings.cache_clear()
    with TestClient(create_app()) as client:
        yield client
    get_settings.cache_clear()
