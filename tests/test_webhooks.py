"""A finished job's summary is POSTed to its callback URL, signed, and retried until received."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from api.auth import create_key
from api.jobs.webhooks import SIGNATURE_HEADER, deliver_due
from gemma_batch.cli.stack import LocalStack
from gemma_batch.settings import get_settings
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Job
from tests.conftest import TINY

SECRET = "webhook-test-secret"


class Receiver(BaseHTTPRequestHandler):
    received: list[tuple[bytes, str]] = []
    failures_left = 0

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        body = self.rfile.read(int(self.headers["content-length"]))
        Receiver.received.append((body, self.headers.get(SIGNATURE_HEADER, "")))
        failing = Receiver.failures_left > 0
        Receiver.failures_left -= failing
        self.send_response(500 if failing else 204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    Receiver.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    # The receiver listens on 127.0.0.1, an internal address: admitted through the allowlist.
    return {"GEMMA_BATCH_WEBHOOK_SECRET": SECRET, "GEMMA_BATCH_WEBHOOK_ALLOW": "127.0.0.1"}


def test_signed_summary_is_delivered_after_retries(stack: LocalStack, receiver: str) -> None:
    Receiver.failures_left = 2  # the receiver is down twice; the sender keeps trying
    client = stack.client()
    body = {"model": TINY, "items": [{"prompt": "hi"}] * 3, "callback_url": receiver}
    job = client.job(client.request("POST", "/v1/jobs", json=body)["id"])
    assert job.wait(poll=0.3).status == "completed"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        webhook = client.request("GET", f"/v1/jobs/{job.id}")["webhook"]
        if webhook["status"] != "pending":
            break
        time.sleep(0.2)
    # The outbox shows the delivery: received at the third attempt, and so never sent again.
    assert webhook == {"status": "delivered", "attempts": 3, "last_error": None}
    assert len(Receiver.received) == 3
    payload, signature = Receiver.received[-1]
    expected = "sha256=" + hmac.new(SECRET.encode(), payload, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(signature, expected)
    summary = json.loads(payload)
    assert summary["id"] == job.id and summary["status"] == "completed"
    assert summary["counts"] == {"total": 3, "completed": 3, "failed": 0}


def test_a_bad_callback_url_is_refused(stack: LocalStack) -> None:
    body = {"model": TINY, "items": [{"prompt": "hi"}], "callback_url": "not a url"}
    response = stack.client().http.post("/v1/jobs", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "callback_url"


def test_a_tenants_own_secret_signs_its_jobs_webhooks(database_url: str, receiver: str) -> None:
    with session_scope() as session:
        create_key(session, "own-secret", webhook_secret="tenant-secret")
        create_key(session, "no-secret")
        for tenant in ("own-secret", "no-secret"):
            session.add(
                Job(
                    tenant=tenant,
                    model=TINY,
                    status="completed",
                    total=1,
                    callback_url=receiver,
                    webhook_status="pending",
                )
            )
        session.commit()
    settings = get_settings().model_copy(
        update={"webhook_secret": SecretStr(SECRET), "webhook_allow": "127.0.0.1"}
    )
    assert asyncio.run(deliver_due(settings)) == 2
    received = {json.loads(body)["id"]: (body, signature) for body, signature in Receiver.received}
    with session_scope() as session:
        job_of = dict(session.execute(select(Job.tenant, Job.id)).tuples().all())
    for tenant, secret in (("own-secret", "tenant-secret"), ("no-secret", SECRET)):
        body, signature = received[job_of[tenant]]
        expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(signature, expected), tenant
