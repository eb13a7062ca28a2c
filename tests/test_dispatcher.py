"""The dispatcher's releases, on real Redis and both databases: the window, tenants' weights,
sync requests first, and what workers may pull (gemma_batch.dispatch.dispatcher)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, update

from api.auth import create_key
from api.jobs import service as jobs
from api.jobs.schemas import JobCreate
from gemma_batch.dispatch.dispatcher import Release, release
from gemma_batch.dispatch.queues import queue_name
from gemma_batch.dispatch.sweep import chunks_in_broker, sweep
from gemma_batch.domain.records import INTERACTIVE_PRIORITY
from gemma_batch.settings import Settings, get_settings
from gemma_batch.store.claims import claim_next, take_leases
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item, Job
from tests.conftest import TEST_BROKER, TINY

# Chunks of 4 items, a window of 2 chunks: with no live worker, 8 released items at most.
ENV = {"GEMMA_BATCH_CHUNK_SIZE": "4", "GEMMA_BATCH_DISPATCH_WINDOW": "2"}


@pytest.fixture
def settings(
    database_url: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield get_settings()
    client = redis.Redis.from_url(TEST_BROKER)
    for key in client.scan_iter(match=f"{queue_name(TINY)}*", _type="list"):
        client.delete(key)
    get_settings.cache_clear()


def _submit(settings: Settings, tenant: str, count: int, weight: int = 1) -> str:
    with session_scope() as session:
        create_key(session, tenant, weight=weight)
        request = JobCreate.model_validate(
            {"model": TINY, "items": [{"prompt": f"{tenant} {i}"} for i in range(count)]}
        )
        return jobs.create_job(session, request, settings, tenant).id


def _released(job_id: str) -> int:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.released


def _release(settings: Settings) -> list[Release]:
    with session_scope() as session:
        releases = release(session, TINY, settings)
        session.commit()
    return releases


def _past() -> datetime:
    return datetime.now(UTC) - timedelta(minutes=5)


def _take(job_id: str, worker: str = "w/1") -> list[int]:
    """What a worker does with a delivered chunk: lease its released items."""
    with session_scope() as session:
        released = _released(job_id)
        claimed = take_leases(
            session, [Item.job_id == job_id, Item.chunk < released], worker, lease_seconds=60
        )
    return [c.item.index for c in claimed]


def test_the_window_and_the_weights_decide_what_is_released(settings: Settings) -> None:
    light = _submit(settings, "light", 40, weight=1)
    # The first job fills the empty window at once: two chunks, the rest waits in SQL.
    assert _released(light) == 2
    assert {chunk for _, chunk in chunks_in_broker(redis.Redis.from_url(TEST_BROKER), {TINY})} == {
        0,
        1,
    }
    heavy = _submit(settings, "heavy", 40, weight=3)
    # The window is full (released, nobody holds them yet): the tick releases nothing.
    assert _release(settings) == []
    assert _released(heavy) == 0

    # A worker leases the window; room again, and it goes to the tenant holding least per
    # weight: light holds 8, heavy nothing, so both chunks are heavy's.
    assert _take(light) == list(range(8))
    sent = _release(settings)
    assert [(r.job_id, r.chunk, r.size) for r in sent] == [(heavy, 0, 4), (heavy, 1, 4)]
    assert (_released(light), _released(heavy)) == (2, 2)
    assert _release(settings) == []  # full again: nothing more

    # Heavy holds 8 too: per weight 8/3 against light's 8, so heavy is next again, twice.
    assert _take(heavy) == list(range(8))
    sent = _release(settings)
    assert [(r.job_id, r.chunk) for r in sent] == [(heavy, 2), (heavy, 3)]


def test_a_submission_releases_only_on_an_idle_model(settings: Settings) -> None:
    first = _submit(settings, "a", 4)
    assert _released(first) == 1  # alone: released by its own submission
    # Beside an open job, the window has room but the submission leaves it to the next tick,
    # which releases every such job in one pass.
    second, third = _submit(settings, "b", 1), _submit(settings, "c", 1)
    assert (_released(second), _released(third)) == (0, 0)
    sent = _release(settings)
    assert sorted((r.job_id, r.chunk, r.size) for r in sent) == sorted(
        [(second, 0, 1), (third, 0, 1)]
    )
    assert (_released(second), _released(third)) == (1, 1)


def test_workers_pull_only_released_items_shared_by_weight(settings: Settings) -> None:
    light = _submit(settings, "light", 40, weight=1)
    heavy = _submit(settings, "heavy", 40, weight=3)
    with session_scope() as session:
        # Both have released items waiting (heavy's released by hand: the window was full).
        session.execute(update(Job).where(Job.id == heavy).values(released=2))
        session.commit()
        specs, claimed = claim_next(session, TINY, "w/1", 60, limit=8)
    got = [(c.job_id, c.item.index) for c in claimed]
    # 8 items, 3 to 1: heavy 6, light 2, each job's in order; nothing from unreleased chunks.
    assert sorted(got) == sorted([(heavy, i) for i in range(6)] + [(light, i) for i in range(2)])
    assert set(specs) == {light, heavy}
    with session_scope() as session:
        _, more = claim_next(session, TINY, "w/1", 60, limit=100)
    assert sorted((c.job_id, c.item.index) for c in more) == sorted(
        [(heavy, 6), (heavy, 7)] + [(light, i) for i in range(2, 8)]
    )


def test_sync_requests_go_out_whole_and_first(settings: Settings) -> None:
    batch = _submit(settings, "batch", 40)
    with session_scope() as session:
        request = JobCreate.model_validate(
            {"model": TINY, "items": [{"prompt": f"sync {i}"} for i in range(12)]}
        )
        items = (
            jobs.NewItem(f"items[{i}].prompt", str(i), item.prompt, None)
            for i, item in enumerate(request.items)
        )
        job = jobs.store_job(
            session, request, items, settings, "sync", priority=INTERACTIVE_PRIORITY
        )
    assert _released(job.id) == 3  # past the window: all of it
    with session_scope() as session:
        _, claimed = claim_next(session, TINY, "w/1", 60, limit=4)
    assert {c.job_id for c in claimed} == {job.id}
    assert _released(batch) == 2


def test_the_sweep_resends_released_chunks_only(settings: Settings) -> None:
    job_id = _submit(settings, "t", 40)
    client = redis.Redis.from_url(TEST_BROKER)
    for key in client.scan_iter(match=f"{queue_name(TINY)}*", _type="list"):
        client.delete(key)
    assert sweep(client, grace=0) == 2  # chunks 0 and 1; 2 to 9 are not released yet
    assert {chunk for _, chunk in chunks_in_broker(client, {TINY})} == {0, 1}
    with session_scope() as session:
        pending = session.scalars(select(Item.chunk).where(Item.job_id == job_id)).all()
    assert max(pending) == 9


def test_the_sweep_takes_on_jobs_an_older_api_stored(settings: Settings) -> None:
    """A rolling upgrade: an API process from before the dispatcher sent every chunk at submit
    and recorded no counts; the sweep records them all as released, then looks after them."""
    job_id = _submit(settings, "t", 40)
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(chunks=0, released=0))
        session.commit()
    client = redis.Redis.from_url(TEST_BROKER)
    for key in client.scan_iter(match=f"{queue_name(TINY)}*", _type="list"):
        client.delete(key)
    assert sweep(client, grace=60) == 0  # just recorded: its grace starts now
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.chunks, job.released) == (10, 10)
        session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=_past()))
        session.commit()
    assert sweep(client, grace=60) == 10  # every chunk: none has a message
