"""Word of finished sync requests over real Redis pub/sub: what wakes a sync call's wait."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import suppress
from pathlib import Path

import pytest
from sqlalchemy import select

from api.openai import completions
from api.openai.schemas import CompletionRequest
from gemma_batch.dispatch.finished import Announcer, FinishedJobs
from gemma_batch.domain.records import ItemResult
from gemma_batch.settings import get_settings
from gemma_batch.store.results import record_results
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Job
from tests.conftest import TINY


async def _subscribed(jobs: FinishedJobs, announcer: Announcer) -> asyncio.Task[None]:
    """The listener started and heard: a probe's word is sent until it arrives."""
    listening = asyncio.create_task(jobs.listen_forever(get_settings()))
    deadline = time.monotonic() + 10
    with jobs.watching("probe") as probe:
        while not probe.is_set():
            assert time.monotonic() < deadline, "the listener never heard a word"
            announcer.announce("probe")
            with suppress(TimeoutError):
                await asyncio.wait_for(probe.wait(), 0.1)
    return listening


def test_an_announced_job_wakes_its_watchers_and_no_others(sqlite_url: str) -> None:
    settings = get_settings()
    announcer = Announcer(settings)
    # A stack on another database sharing the broker: its words are not this store's.
    elsewhere = Announcer(settings.model_copy(update={"database_url": "sqlite:///elsewhere.db"}))

    async def scenario() -> tuple[bool, bool]:
        jobs = FinishedJobs()
        listening = await _subscribed(jobs, announcer)
        try:
            with jobs.watching("a") as a, jobs.watching("b") as b, jobs.watching("c") as c:
                announcer.announce("a")
                elsewhere.announce("b")
                elsewhere.close()  # b's word is out before c's
                announcer.announce("c")
                # Words come in order on the one subscription: once c's is in, a's was handled.
                await asyncio.wait_for(c.wait(), 10)
                return a.is_set(), b.is_set()
        finally:
            listening.cancel()

    try:
        assert asyncio.run(scenario()) == (True, False)
    finally:
        announcer.close()


def test_a_word_that_cannot_be_sent_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    # Nothing listens on port 1: the caller does not wait, and the announcer says what it dropped.
    url = "redis://127.0.0.1:1/0"
    announcer = Announcer(get_settings().model_copy(update={"broker_url": url}))
    started = time.monotonic()
    announcer.announce("job-c")
    assert time.monotonic() - started < 0.5
    deadline = time.monotonic() + 10
    while "could not announce job job-c finished" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.05)
    announcer.close()


def test_a_sync_call_answers_on_the_word_not_the_poll(
    sqlite_url: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store polled once a minute: the call ends within the test's deadline only on the word.
    monkeypatch.setattr(completions, "FIRST_POLL", 60.0)
    monkeypatch.setattr(completions, "LONGEST_POLL", 60.0)
    settings = get_settings()
    announcer = Announcer(settings)
    request = CompletionRequest.model_validate({"model": TINY, "prompt": "hi", "max_tokens": 2})
    looked = threading.Event()
    finished = completions._finished

    def watched(job_id: str) -> object:
        items = finished(job_id)
        looked.set()
        return items

    monkeypatch.setattr(completions, "_finished", watched)

    def worker() -> None:
        """What a worker does once the call has looked in the store and found no answer:
        store the answer, then announce the job."""
        assert looked.wait(10)
        with session_scope() as session:
            job_id = session.scalar(select(Job.id).where(Job.status == "queued"))
            answer = ItemResult(0, output=" there", finish_reason="stop", completion_tokens=1)
            assert record_results(session, {job_id: [answer]}) == {job_id}
        announcer.announce(job_id)

    async def gone() -> bool:
        return False

    async def scenario() -> dict[str, object]:
        listening = await _subscribed(completions.finished_jobs, announcer)
        answering = threading.Thread(target=worker)
        answering.start()
        try:
            call = completions.complete(request, "/v1/completions", settings, "tests", gone)
            return await asyncio.wait_for(call, 20)
        finally:
            listening.cancel()
            answering.join()

    try:
        body = asyncio.run(scenario())
    finally:
        announcer.close()
    assert body["choices"][0]["text"] == " there"  # type: ignore[index]
