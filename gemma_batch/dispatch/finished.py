"""Word that a job has finished, over Redis pub/sub: a wake-up for whoever waits on it.

A worker announces each job it finishes; a sync call's wait in the API wakes on the word and
reads the answer from the store. The store stays the truth: a word lost (Redis restarting, a
listener reconnecting) costs the waiter only its next poll of the store, about a quarter of a
second later. Before this, that poll was the only way: it made about a tenth of an idle sync
call's time on a CPU (docs/benchmarks.md, W5).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import redis
import redis.asyncio

log = logging.getLogger(__name__)

CHANNEL = "gemma-batch:finished"


def announce(client: redis.Redis, job_id: str) -> None:
    """Tell every listener that `job_id` has finished; a word that cannot be sent is dropped."""
    try:
        client.publish(CHANNEL, job_id)
    except redis.RedisError as exc:
        log.warning("could not announce job %s finished: %s", job_id, exc)


class FinishedJobs:
    """One subscription per API process, and the events of the calls waiting for a job."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Event]] = {}

    @contextmanager
    def watching(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set when `job_id` is announced, for as long as the block runs."""
        event = asyncio.Event()
        self._waiting.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._waiting[job_id]
            events.discard(event)
            if not events:
                del self._waiting[job_id]

    async def listen_forever(self, url: str) -> None:
        while True:
            try:
                await self._listen(url)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: waiters fall back on polling the store
                log.warning("not hearing of finished jobs (%s); listening again in 5 s", exc)
                await asyncio.sleep(5)

    async def _listen(self, url: str) -> None:
        client = redis.asyncio.Redis.from_url(url)
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(CHANNEL)
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        for event in self._waiting.get(message["data"].decode(), ()):
                            event.set()
        finally:
            await client.aclose()
