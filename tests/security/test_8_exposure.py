"""Finding 8: Flower started without auth on every interface, each worker's /metrics bound
0.0.0.0, the API's /metrics was public and ran full-table counts per scrape, and /healthz and 503
bodies echoed the broker's exception text.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from api.main import create_app
from api.ops.metrics import StoreCollector
from gemma_batch.cli.stack import LocalStack, free_port
from gemma_batch.settings import get_settings
from gemma_batch.store.sessions import get_sql_engine
from tests.conftest import TINY, bearer

METRICS_PORT = free_port()


def _listening_on(port: int, deadline: float = 60.0) -> str:
    """The address a local process listens on at `port`, waited for."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        for connection in psutil.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
                return str(connection.laddr.ip)
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on port {port}")


def _flower(*args: str, auth: bool = False) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "GEMMA_BATCH_FLOWER_AUTH"}
    if auth:
        env["GEMMA_BATCH_FLOWER_AUTH"] = "watcher:pass"
    return subprocess.Popen(
        [sys.executable, "-m", "gemma_batch", "flower", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_flower_refuses_to_start_without_auth() -> None:
    process = _flower("--port", str(free_port()))
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "set GEMMA_BATCH_FLOWER_AUTH=user:password, or pass --no-auth" in err
    assert "Traceback" not in err


@pytest.fixture
def open_flower() -> Iterator[int]:
    port = free_port()
    process = _flower("--port", str(port), "--no-auth")
    yield port
    process.terminate()
    try:
        process.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # Flower may not heed SIGTERM while it starts up
        process.kill()
        process.communicate()


def test_flower_without_auth_serves_loopback_only(open_flower: int) -> None:
    assert _listening_on(open_flower) == "127.0.0.1"


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    return {"GEMMA_BATCH_WORKER_METRICS_PORT": str(METRICS_PORT)}


def test_worker_metrics_bind_loopback_by_default(stack: LocalStack) -> None:
    assert _listening_on(METRICS_PORT) == "127.0.0.1"
    assert "gemma_batch_" in httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics").text


@pytest.fixture
def api(sqlite_url: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("GEMMA_BATCH_METRICS_TOKEN", "scrape-token")
    get_settings.cache_clear()
    with TestClient(create_app(), headers=bearer("acme-corp")) as client:
        yield client
    get_settings.cache_clear()


def test_api_metrics_take_a_bearer_token_and_name_no_tenant(api: TestClient) -> None:
    assert api.post("/v1/jobs", json={"model": TINY, "items": [{"prompt": "x"}]}).status_code == 202
    assert api.get("/metrics", headers={"Authorization": ""}).status_code == 401
    assert api.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    scraped = api.get("/metrics", headers={"Authorization": "Bearer scrape-token"})
    assert scraped.status_code == 200
    assert 'gemma_batch_items{state="queued"} 1.0' in scraped.text
    assert "acme" not in scraped.text and "tenant" not in scraped.text


def test_scrapes_at_once_share_one_reading(api: TestClient) -> None:
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    engine = get_sql_engine()
    event.listen(engine, "before_cursor_execute", count)
    collector = StoreCollector()
    gate = threading.Barrier(20)

    def scrape() -> None:
        gate.wait()
        list(collector.collect())

    threads = [threading.Thread(target=scrape) for _ in range(20)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    readings = [s for s in statements if "GROUP BY jobs.status" in s]
    assert 1 <= len(readings) <= 2  # one reading, and at most one that began before the rest
    # Items are only counted where leased (an index); everything else comes from job counters.
    on_items = [s for s in statements if "FROM items" in s]
    assert all("items.lease_until >" in s for s in on_items)


def test_health_and_503s_carry_no_exception_text(
    sqlite_url: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMMA_BATCH_BROKER_URL", f"redis://user:hunter2@127.0.0.1:{free_port()}/0")
    get_settings.cache_clear()
    with TestClient(create_app(), headers=bearer("tests")) as client:
        health = client.get("/healthz")
        assert health.status_code == 503
        assert health.json() == {"status": "degraded", "database": "ok", "broker": "unreachable"}
    get_settings.cache_clear()
    # A submit's 503 with the broker down (a real API process) is in tests/test_broker_down.py.
