"""Finding 2: callback URLs reached internal addresses, one slow receiver held up everyone's
webhooks, a webhook was marked sent before it was sent, and full URLs went into the logs.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.jobs.webhooks import REQUEST_SECONDS, deliver_due
from gemma_batch.settings import Settings, get_settings
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Job
from tests.conftest import TINY
from tests.security.conftest import Receiver


def _internal_urls(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/hook",
        f"http://2130706433:{port}/hook",  # 127.0.0.1 spelled as one number
        f"http://localhost:{port}/hook",
        f"http://[::1]:{port}/hook",
        f"http://0.0.0.0:{port}/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://100.64.0.1/hook",
        "http://224.0.0.1/hook",
        "http://[::ffff:127.0.0.1]/hook",
    ]


def test_internal_and_credentialed_callbacks_are_refused_at_submit(
    client: TestClient, receiver: Receiver
) -> None:
    port = int(receiver.url.rsplit(":", 1)[1])
    for url in _internal_urls(port):
        body = {"model": TINY, "items": [{"prompt": "x"}], "callback_url": url}
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 422, url
        error = response.json()["error"]
        assert error["param"] == "callback_url"
        assert "an internal address" in error["message"], url
    body = {"model": TINY, "items": [{"prompt": "x"}], "callback_url": "http://u:pw@example.com/"}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    assert "may not carry a user name or password" in response.json()["error"]["message"]
    assert client.get("/v1/jobs").json()["data"] == []
    assert receiver.hits == []


def test_the_allowlist_admits_an_internal_receiver(
    client: TestClient, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMMA_BATCH_WEBHOOK_ALLOW", "127.0.0.0/8")
    get_settings.cache_clear()
    body = {"model": TINY, "items": [{"prompt": "x"}], "callback_url": f"{receiver.url}/hook"}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["webhook"] == {"status": "pending", "attempts": 0, "last_error": None}


def _finished_job(url: str) -> str:
    with session_scope() as session:
        job = Job(
            tenant="tests",
            model=TINY,
            status="completed",
            total=1,
            callback_url=url,
            webhook_status="pending",
        )
        session.add(job)
        session.commit()
        return job.id


def _job(job_id: str) -> Job:
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        assert job is not None
        return job


def _settings(allow: str) -> Settings:
    return get_settings().model_copy(update={"webhook_allow": allow})


@pytest.fixture
def store(sqlite_url: str, model_dir: Path) -> str:
    return sqlite_url


def test_send_time_checks_the_address_connected_to(store: str, receiver: Receiver) -> None:
    # A URL that passed at submit (a DNS answer can change since) is checked again at send time.
    job_id = _finished_job(f"{receiver.url}/hook")
    assert asyncio.run(deliver_due(_settings(""))) == 0
    assert receiver.hits == []
    refused = _job(job_id)
    assert refused.webhook_status == "pending"
    assert refused.webhook_error is not None
    assert refused.webhook_error.startswith("its host resolves to 127.0.0.1, an internal address")
    # Once the operator admits it, the retry (due after its backoff) is received.
    with session_scope() as session:
        session.get(Job, job_id).webhook_next_at = None  # type: ignore[union-attr]
        session.commit()
    assert asyncio.run(deliver_due(_settings("127.0.0.1"))) == 1
    assert receiver.hits == ["/hook"]
    delivered = _job(job_id)
    assert (delivered.webhook_status, delivered.webhook_attempts) == ("delivered", 2)


@pytest.fixture
def trickler() -> Iterator[str]:
    """A receiver that answers one byte a second, for ever: a per-byte timeout never fires."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            for byte in b"HTTP/1.1 200 OK\r\n" * 10:
                if stop.wait(1.0):
                    return
                connection.sendall(bytes([byte]))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/slow"
    stop.set()
    server.close()


def test_a_slow_receiver_delays_nobody_else(store: str, receiver: Receiver, trickler: str) -> None:
    slow = _finished_job(trickler)
    fast = _finished_job(f"{receiver.url}/fast")
    round_done = threading.Event()

    def deliver() -> None:
        asyncio.run(deliver_due(_settings("127.0.0.1")))
        round_done.set()

    threading.Thread(target=deliver, daemon=True).start()
    # The fast receiver has its webhook while the slow one is still trickling its answer.
    assert receiver.arrived.wait(REQUEST_SECONDS - 2)
    assert not round_done.is_set()
    assert round_done.wait(REQUEST_SECONDS + 20)
    assert _job(fast).webhook_status == "delivered"
    # The slow one was cut at the total timeout, though a byte came every second, and is retried.
    cut = _job(slow)
    assert (cut.webhook_status, cut.webhook_error) == ("pending", "no answer within 10 s")


def test_logs_never_hold_the_callback_url(store: str, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    job_id = _finished_job(f"http://127.0.0.1:{port}/hook/secret-path?token=SECRET-TOKEN")
    with caplog.at_level(logging.WARNING):
        assert asyncio.run(deliver_due(_settings("127.0.0.1"))) == 0
    logged = caplog.text
    assert f"webhook of job {job_id} to host 127.0.0.1 failed" in logged
    assert "SECRET-TOKEN" not in logged and "secret-path" not in logged
    assert _job(job_id).webhook_error == "could not connect (ConnectError)"
