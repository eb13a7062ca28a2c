"""A sync call whose caller gives up leaves no job behind, with the `openai` client's default
retries: the server's own timeout tells the client not to retry, and a client that hangs up has
its request cancelled. The worker is stopped, so nothing would ever answer."""

from __future__ import annotations

import time

import openai
import pytest
from openai import OpenAI
from sqlalchemy import select

from gemma_batch.cli.stack import LocalStack
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Job, as_utc
from tests.conftest import TINY
from tests.openai_spec import check

CHAT = [{"role": "user", "content": "hi"}]
SYNC_TIMEOUT = 4


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    return {"GEMMA_BATCH_SYNC_TIMEOUT": str(SYNC_TIMEOUT)}


@pytest.fixture(scope="module")
def idle(stack: LocalStack) -> LocalStack:
    stack.stop("worker")
    return stack


def _sync_jobs(after: str) -> list[tuple[str, float | None]]:
    """Each job made since `after`: its status, and how long it lived if it ended."""
    with session_scope() as session:
        jobs = session.scalars(select(Job).where(Job.id > after).order_by(Job.id)).all()
    return [
        (
            job.status,
            (as_utc(job.finished_at) - as_utc(job.created_at)).total_seconds()  # type: ignore[operator]
            if job.finished_at
            else None,
        )
        for job in jobs
    ]


def _newest() -> str:
    with session_scope() as session:
        return session.scalar(select(Job.id).order_by(Job.id.desc()).limit(1)) or ""


def test_the_servers_timeout_cancels_and_is_not_retried(idle: LocalStack) -> None:
    before = _newest()
    client = OpenAI(base_url=f"{idle.url}/v1", api_key=idle.api_key)  # default: 2 retries
    with pytest.raises(openai.InternalServerError) as timed_out:
        client.chat.completions.create(model=TINY, messages=CHAT, max_tokens=2)
    assert timed_out.value.status_code == 504
    assert timed_out.value.response.headers["x-should-retry"] == "false"
    error = check("ErrorResponse", timed_out.value.response.json())["error"]
    assert (error["type"], error["code"]) == ("server_error", "timeout")
    # One job for the one call, and it was cancelled: nothing is left to run.
    [(status, lived)] = _sync_jobs(before)
    assert status == "cancelled" and lived is not None and lived >= SYNC_TIMEOUT


def test_a_client_that_hangs_up_has_its_requests_cancelled(idle: LocalStack) -> None:
    before = _newest()
    # The client gives up before the server's own timeout, and retries twice (its default).
    client = OpenAI(base_url=f"{idle.url}/v1", api_key=idle.api_key, timeout=0.4)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model=TINY, messages=CHAT, max_tokens=2)
    deadline = time.monotonic() + 30
    while len(jobs := _sync_jobs(before)) < 3 or any(status != "cancelled" for status, _ in jobs):
        assert time.monotonic() < deadline, jobs
        time.sleep(0.1)
    assert [status for status, _ in jobs] == ["cancelled"] * 3
    # Cancelled when the client hung up, not later by the server's own timeout.
    assert all(lived is not None and lived < SYNC_TIMEOUT for _, lived in jobs)
