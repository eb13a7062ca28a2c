"""A tenant cannot take more than its share of the workers (gemma_batch.dispatch.dispatcher).

On the full stack (API, a worker process, PostgreSQL, Redis): another tenant's 1-item job does
not wait behind a 2,000-item backlog, and two tenants with big jobs and weights 1 and 3 get
throughput shares of 1:3. Both measured on the store's own timestamps; the figures go to
docs/benchmarks.md (run with `-s` to see them).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.auth import create_key
from gemma_batch.store.tables import Item, Job
from tests.faults.conftest import FaultStack, prompts, wait_for

# Chunks of 16 items, about that many rows in a batch, a window of 4 chunks per worker: a
# tenant's small job waits for that window at most, never for another's backlog.
ENV = {
    "GEMMA_BATCH_CHUNK_SIZE": "16",
    "GEMMA_BATCH_BATCH_TOKENS": "512",
    "GEMMA_BATCH_DISPATCH_WINDOW": "4",
    "GEMMA_BATCH_DISPATCH_INTERVAL": "0.2",
}
CHUNK = 16


def _key(stack: FaultStack, tenant: str, weight: int = 1) -> dict[str, str]:
    with Session(stack.store.engine) as session:
        key = create_key(session, tenant, weight=weight).key
    return {"Authorization": f"Bearer {key}"}


def _chunk_time(session: Session, job_id: str) -> float:
    """How long one of the job's finished chunks took to run, first start to last end (median)."""
    spans = session.execute(
        select(func.min(Item.started_at), func.max(Item.finished_at))
        .where(Item.job_id == job_id)
        .group_by(Item.chunk)
        .having(func.count() == func.count(Item.finished_at))
    ).all()
    return statistics.median((end - start).total_seconds() for start, end in spans)


def _wait_completed(stack: FaultStack, job_id: str, timeout: float) -> None:
    # Read in the store: the stack's own API key is another tenant's, which sees a 404.
    done = lambda: stack.store.job(job_id).status == "completed"  # noqa: E731
    wait_for(done, timeout, lambda: stack.describe(job_id))


def _times(stack: FaultStack, job_id: str) -> list[datetime]:
    """When each of the job's items finished, in order (the database's clock)."""
    with Session(stack.store.engine) as session:
        return sorted(
            session.scalars(
                select(Item.finished_at).where(Item.job_id == job_id, Item.status == "completed")
            )
        )


def test_a_small_job_does_not_wait_for_another_tenants_backlog(
    make_stack: Callable[..., FaultStack],
) -> None:
    stack = make_stack(env=ENV)
    owner = _key(stack, "big-a")
    # 50 ms an item, so a chunk takes as long as one of 64 short answers on a GPU.
    big = stack.api.submit(prompts(2000, sleep=0.05), headers=owner)["id"]
    stack.wait_completed_items(big, 4 * CHUNK, timeout=120)

    small = stack.api.submit(prompts(1), headers=_key(stack, "small-b"))["id"]
    _wait_completed(stack, small, 120)
    with Session(stack.store.engine) as session:
        job = session.get(Job, small)
        assert job is not None and job.finished_at is not None
        (item,) = session.scalars(select(Item).where(Item.job_id == small))
        waited = (job.finished_at - job.created_at).total_seconds()
        own = (item.finished_at - item.started_at).total_seconds()
        behind = 2000 - stack.store.completed(big)
        chunk_time = _chunk_time(session, big)
    assert behind > 0, "the big job ended first: this measured nothing"
    print(
        f"\n1-item job behind a 2,000-item one: waited {waited:.2f} s, its own run {own:.2f} s, "
        f"one chunk of the backlog {chunk_time:.2f} s; "
        f"{behind} backlog items still to run when it ended"
    )
    assert waited <= 2 * chunk_time + own, (waited, chunk_time, own)
    assert stack.api.http.post(f"/v1/jobs/{big}/cancel", headers=owner).status_code == 200


def test_weights_one_and_three_share_the_worker_one_to_three(
    make_stack: Callable[..., FaultStack],
) -> None:
    stack = make_stack(env=ENV)
    total = 1200
    light = stack.api.submit(prompts(total, sleep=0.01), headers=_key(stack, "weight-1", 1))["id"]
    heavy = stack.api.submit(prompts(total, sleep=0.01), headers=_key(stack, "weight-3", 3))["id"]
    # Over once the weight-3 tenant's job is: from then on the other has the worker alone.
    _wait_completed(stack, heavy, 600)
    light_times, heavy_times = _times(stack, light), _times(stack, heavy)
    # Measured between a tenth and nine tenths of the weight-3 job: past the first window
    # (released before the second job existed) and before its last one drains.
    start, end = heavy_times[total // 10], heavy_times[total * 9 // 10]
    light_done = sum(start < t <= end for t in light_times)
    heavy_done = sum(start < t <= end for t in heavy_times)
    ratio = heavy_done / max(light_done, 1)
    print(
        f"\nweights 1 and 3 over {(end - start).total_seconds():.1f} s: {light_done} and "
        f"{heavy_done} items, {ratio:.2f} : 1 (target 3 : 1)"
    )
    assert 2.7 <= ratio <= 3.3, (light_done, heavy_done)
    wait_for(
        lambda: stack.store.job(light).status == "completed", 600, lambda: stack.describe(light)
    )
    for job_id in (light, heavy):
        rows = stack.store.items(job_id)
        assert [(row.status, row.attempts) for row in rows] == [("completed", 1)] * total
