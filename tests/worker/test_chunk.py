"""One delivery of a chunk, in process on the tiny model: poison items and redelivered ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select, update

from api.jobs import service as jobs
from api.jobs.schemas import JobCreate
from gemma_batch.settings import get_settings
from gemma_batch.store.claims import claim_chunk
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item, Job
from tests.conftest import TINY
from worker.chunk import Chunk
from worker.engine.engine import Engine
from worker.engine.loader import load_model


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    model, tokenizer = load_model(model_dir / TINY, "none", "cpu")
    return Engine(model, tokenizer, batch_tokens=4096, inject_faults=True)


def _job(prompts: list[str]) -> str:
    request = JobCreate.model_validate(
        {"model": TINY, "items": [{"prompt": p} for p in prompts], "params": {"max_new_tokens": 3}}
    )
    with session_scope() as session:
        return jobs.create_job(session, request, get_settings(), "tests").id


def _run(engine: Engine, job_id: str) -> int:
    with session_scope() as session:
        spec, claimed = claim_chunk(session, job_id, 0, "worker-a/1", lease_seconds=60)
    assert spec is not None
    return Chunk(engine, job_id, spec, max_attempts=3).run(claimed)


def _items(job_id: str) -> list[Item]:
    with session_scope() as session:
        return list(session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.index)))


def test_an_item_that_raises_is_found_by_bisecting_and_failed_alone(
    database_url: str, engine: Engine
) -> None:
    prompts = [f"item {i}" for i in range(64)]
    prompts[37] = "item @@raise@@"
    job_id = _job(prompts)
    assert _run(engine, job_id) == 64
    items = _items(job_id)
    assert [i.index for i in items if i.status == "failed"] == [37]
    assert items[37].error == "RuntimeError: injected fault"
    assert all(i.status == "completed" and i.output is not None for i in items if i.index != 37)
    assert all(i.attempts == 1 for i in items)  # bisecting in one delivery is one run
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.completed, job.failed) == ("completed", 63, 1)


def test_after_a_dead_worker_suspects_run_alone_and_repeat_offenders_fail_unrun(
    database_url: str, engine: Engine
) -> None:
    job_id = _job(["fresh", "died once", "died thrice"])
    # What two earlier deliveries that killed their worker leave behind.
    with session_scope() as session:
        for index, attempts in [(1, 1), (2, 3)]:
            session.execute(
                update(Item)
                .where(Item.job_id == job_id, Item.index == index)
                .values(attempts=attempts)
            )
        session.commit()
    assert _run(engine, job_id) == 3
    fresh, suspect, doomed = _items(job_id)
    assert (fresh.status, fresh.attempts) == ("completed", 1)
    assert (suspect.status, suspect.attempts) == ("completed", 2)
    assert (doomed.status, doomed.attempts) == ("failed", 3)
    assert doomed.error is not None and "died in each of this item's 3 runs" in doomed.error


def test_a_second_delivery_skips_leased_and_finished_items(
    database_url: str, engine: Engine
) -> None:
    job_id = _job(["a", "b"])
    with session_scope() as session:
        _, first = claim_chunk(session, job_id, 0, "worker-a/1", lease_seconds=60)
        _, second = claim_chunk(session, job_id, 0, "worker-b/2", lease_seconds=60)
    assert [c.item.index for c in first] == [0, 1]
    assert second == []  # leased by a live worker: not computed twice
    with session_scope() as session:
        assert jobs.get_job(session, job_id, "tests").status == "running"
