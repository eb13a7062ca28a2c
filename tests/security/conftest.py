"""Attacks as a hostile tenant would make them: an in-process API on a real database and Redis,
with limits small enough to pass cheaply, and a receiver on 127.0.0.1 that records what reaches it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from gemma_batch.settings import get_settings
from tests.conftest import bearer

LIMITS = {
    "GEMMA_BATCH_MAX_ROW_BYTES": "65536",
    "GEMMA_BATCH_MAX_BATCH_REQUESTS": "10",
    "GEMMA_BATCH_MAX_CHOICES": "50",
    "GEMMA_BATCH_MAX_CHOICES_CHARS": "2000",
    "GEMMA_BATCH_MAX_METADATA_BYTES": "1024",
}


@pytest.fixture
def client(
    sqlite_url: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    """The API in process on SQLite, as the tenant "tests"."""
    for name, value in LIMITS.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    with TestClient(create_app(), headers=bearer("tests")) as client:
        yield client
    get_settings.cache_clear()


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1: what it was sent, by path."""

    url: str
    hits: list[str] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    record = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            record.hits.append(self.path)
            record.arrived.set()
            self.send_response(204)
            self.end_headers()

        do_GET = do_POST = _any  # noqa: N815 - the names http.server calls

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    record.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield record
    server.shutdown()
    server.server_close()
