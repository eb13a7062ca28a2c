"""Word that a sync request has finished, over Redis pub/sub: a wake-up for the call waiting.

A worker announces each sync request (job) it finishes; the call's wait in the API wakes on the
word and reads the answer from the store. The store stays the truth: a word lost (Redis
restarting, a listener reconnecting, a queue of words full) costs the waiter only its next poll
of the store, a quarter of a second later at most. Before the word, that poll was the only way:
0.1-0.2 s of an idle 16-token call's 1.2-1.5 s on a CPU (docs/benchmarks.md, W5).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from gemma_batch.settings import Settings

log = logging.getLogger(__name__)

# Words waiting to be sent; more are dropped (a Redis that hangs must hold no one).
WAITING_MOST = 1000


def channel(settings: Settings) -> str:
    """One channel per store: stacks on other databases may share the broker."""
    return f"gemma-batch:finished:{settings.store_tag()}"


class Announcer:
    """Sends the words from a thread of its own, so that the caller (the worker's result
    writer) never waits on Redis: each send gives up after a second, without retrying."""

    def __init__(self, settings: Settings) -> None:
        self._client = redis.Redis.from_url(
            settings.broker_url,
            socket_timeout=1,
            socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )
        self._channel = channel(settings)
        self._queue: queue.Queue[str | None] = queue.Queue(WAITING_MOST)
        self._thread = threading.Thread(target=self._run, name="announcer", daemon=True)
        self._thread.start()

    def announce(self, job_id: str) -> None:
        with suppress(queue.Full):
            self._queue.put_nowait(job_id)

    def close(self) -> None:
        """Stop after the words queued, waiting a second at most: the rest are dropped."""
        with suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout=1)

    def _run(self) -> None:
        while (job_id := self._queue.get()) is not None:
            try:
                self._client.publish(self._channel, job_id)
            except Exception as exc:  # any failure only costs the waiter a poll
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

    async def listen_forever(self, settings: Settings) -> None:
        """Hear the words of this store's workers until cancelled, subscribing again 5 s after
        Redis goes away (meanwhile waiters poll the store)."""
        while True:
            try:
                await self._listen(settings)
            except Exception as exc:
                log.warning("not hearing of finished jobs (%s); listening again in 5 s", exc)
            await asyncio.sleep(5)

    async def _listen(self, settings: Settings) -> None:
        # Health checks find a connection that died without a word, which would leave the
        # listener deaf.
        client = redis.asyncio.Redis.from_url(
            settings.broker_url, health_check_interval=30, socket_keepalive=True
        )
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(channel(settings))
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        job_id = message["data"].decode(errors="replace")
                        for event in self._waiting.get(job_id, ()):
                            event.set()
        finally:
            await client.aclose()
