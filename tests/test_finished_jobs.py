"""Word of finished jobs over real Redis pub/sub: what wakes a sync call's wait."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from gemma_batch.dispatch.finished import CHANNEL, FinishedJobs, announce
from tests.conftest import TEST_BROKER


def test_an_announced_job_wakes_its_watchers_and_no_others() -> None:
    client = redis.Redis.from_url(TEST_BROKER)

    async def scenario() -> tuple[bool, bool]:
        jobs = FinishedJobs()
        before = dict(client.pubsub_numsub(CHANNEL))[CHANNEL.encode()]
        listening = asyncio.create_task(jobs.listen_forever(TEST_BROKER))
        deadline = time.monotonic() + 10
        while dict(client.pubsub_numsub(CHANNEL))[CHANNEL.encode()] == before:
            assert time.monotonic() < deadline, "the listener never subscribed"
            await asyncio.sleep(0.01)
        with jobs.watching("a") as a, jobs.watching("b") as b, jobs.watching("c") as c:
            announce(client, "a")
            announce(client, "c")
            # Words come in order on the one subscription: once c's is in, a's was handled.
            await asyncio.wait_for(c.wait(), 10)
            woken = a.is_set(), b.is_set()
        listening.cancel()
        return woken

    assert asyncio.run(scenario()) == (True, False)


def test_a_word_that_cannot_be_sent_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    # Nothing listens on port 1: announcing fails fast and says so, without raising.
    announce(redis.Redis(port=1, socket_connect_timeout=1), "job-c")
    assert "could not announce job job-c finished" in caplog.text
