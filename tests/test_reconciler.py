"""The sweep for lost tasks, on real Redis and both databases: what it re-sends and what not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from api.jobs import service as jobs
from api.jobs.schemas import JobCreate
from gemma_batch.dispatch.queues import queue_name
from gemma_batch.dispatch.sweep import chunks_in_broker, sweep
from gemma_batch.settings import get_settings
from gemma_batch.store.claims import take_leases
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item
from tests.conftest import TEST_BROKER, TINY


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(TEST_BROKER)
    yield client
    _lose_messages(client)


def _lose_messages(client: redis.Redis) -> None:
    """What a Redis restarted without its data does to this model's queue."""
    for key in client.scan_iter(match=f"{queue_name(TINY)}*", _type="list"):
        client.delete(key)


def test_lost_chunks_are_sent_again_once_and_leased_ones_not(
    database_url: str, model_dir: Path, broker: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMMA_BATCH_CHUNK_SIZE", "2")
    get_settings.cache_clear()
    request = JobCreate.model_validate(
        {"model": TINY, "items": [{"prompt": f"p{i}"} for i in range(5)]}
    )
    with session_scope() as session:
        job = jobs.create_job(session, request, get_settings(), "tests")
    every = {(job.id, 0), (job.id, 1), (job.id, 2)}
    assert chunks_in_broker(broker, {TINY}) >= every

    _lose_messages(broker)
    assert not chunks_in_broker(broker, {TINY}) & every
    assert sweep(broker, grace=3600) == 0  # a job dispatched a moment ago is left alone
    assert sweep(broker, grace=0) == 3
    assert chunks_in_broker(broker, {TINY}) >= every
    assert sweep(broker, grace=0) == 0  # queued already: not sent twice

    _lose_messages(broker)
    with session_scope() as session:
        leased = take_leases(
            session, [Item.job_id == job.id, Item.chunk == 1], "worker-a/1", lease_seconds=60
        )
    assert [c.item.index for c in leased] == [2, 3]
    assert sweep(broker, grace=0) == 2  # chunk 1 is in a live worker's hands
    assert chunks_in_broker(broker, {TINY}) & every == {(job.id, 0), (job.id, 2)}
    get_settings.cache_clear()
