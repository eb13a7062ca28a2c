"""How a worker takes items: claiming a chunk's items, leasing them, renewing the leases.

Every claim is one conditional UPDATE on pending, unleased items, so of two workers racing for
the same rows only one gets each row, and a chunk delivered twice is computed once.

A worker claims the items of each chunk delivered to it, and pulls more as its batch has room:
items of released chunks (gemma_batch.dispatch.dispatcher) that nobody holds, of any open job of
its model, shared out among tenants by weight (gemma_batch.store.shares). The chunks of pulled
items keep their own messages in the broker: if this worker dies, those messages (or the sweep)
bring the items back once their leases lapse, and once the items are done the messages find
nothing left to do.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import (
    FINISHED_JOB_STATES,
    ItemStatus,
    JobStatus,
    WorkItem,
)
from gemma_batch.store.shares import PENDING, Shares, held, lease_free, waiting, weights
from gemma_batch.store.tables import Item, Job, db_now


def job_spec(job: Job) -> JobSpec:
    return JobSpec(
        params=GenerationParams.model_validate(job.params),
        prefix=job.prefix or "",
        chat=job.chat,
        choices=job.choices,
        json_schema=job.json_schema,
        adapter=job.adapter,
    )


@dataclass(frozen=True)
class Claimed:
    """An item a worker holds the lease on, with how many runs it has started before."""

    job_id: str
    chunk: int
    item_id: int
    attempts: int
    item: WorkItem
    priority: int  # the job's: sync requests' rows go first


def take_leases(
    session: Session, where: list[ColumnElement[bool]], worker: str, lease_seconds: float
) -> list[Claimed]:
    """Lease the pending items matching `where` that no live worker holds.

    One conditional UPDATE: of two workers racing for the same rows, only one gets each row.
    """
    now = db_now(session)
    ids = session.scalars(
        update(Item)
        .where(*where, Item.status == ItemStatus.PENDING, lease_free(now))
        .values(worker=worker, lease_until=now + timedelta(seconds=lease_seconds))
        .returning(Item.id)
    ).all()
    rows = session.execute(
        select(Item, Job.priority)
        .join(Job, Job.id == Item.job_id)
        .where(Item.id.in_(ids))
        .order_by(Item.job_id, Item.index)
    ).all()
    session.execute(
        update(Job)
        .where(Job.id.in_({row.job_id for row, _ in rows}), Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, started_at=now)
    )
    session.commit()
    return [
        Claimed(
            row.job_id,
            row.chunk,
            row.id,
            row.attempts,
            WorkItem(row.index, row.prompt, row.messages, row.params),
            priority,
        )
        for row, priority in rows
    ]


def claim_chunk(
    session: Session, job_id: str, chunk: int, worker: str, lease_seconds: float
) -> tuple[JobSpec | None, list[Claimed]]:
    """The job's spec and the chunk's pending items this worker now leases.

    Items already done (a redelivered chunk) or leased by a live worker (a chunk handed out
    twice) are skipped, so nothing is computed twice; the job over, nothing is claimed.
    """
    job = session.get(Job, job_id)
    if job is None or job.status in FINISHED_JOB_STATES:
        return None, []
    claimed = take_leases(
        session, [Item.job_id == job_id, Item.chunk == chunk], worker, lease_seconds
    )
    return job_spec(job), claimed


def mark_started(session: Session, item_ids: list[int]) -> None:
    """Count a run of these items before it starts: a run that kills its worker still counts."""
    session.execute(
        update(Item)
        .where(Item.id.in_(item_ids))
        .values(attempts=Item.attempts + 1, started_at=db_now(session))
    )
    session.commit()


def release_leases(session: Session, item_ids: list[int], worker: str) -> None:
    """Give back items this worker holds but has not started, for any worker to take at once."""
    session.execute(
        update(Item)
        .where(Item.id.in_(item_ids), Item.worker == worker, Item.status == ItemStatus.PENDING)
        .values(lease_until=None)
    )
    session.commit()


def renew_leases(session: Session, item_ids: list[int], worker: str, lease_seconds: float) -> None:
    session.execute(
        update(Item)
        .where(Item.id.in_(item_ids), Item.worker == worker, Item.status == ItemStatus.PENDING)
        .values(lease_until=db_now(session) + timedelta(seconds=lease_seconds))
    )
    session.commit()


def claim_next(
    session: Session,
    model: str,
    worker: str,
    lease_seconds: float,
    limit: int,
    interactive: bool = False,
) -> tuple[dict[str, JobSpec], list[Claimed]]:
    """Up to `limit` released items of `model` that nobody holds (only sync requests' with
    `interactive`), and the spec of each job they belong to.

    Sync requests first; then each item to the tenant holding least for its weight
    (gemma_batch.store.shares), each tenant's jobs oldest first, each job's items in order.
    """
    now = db_now(session)
    jobs = waiting(session, model, now, interactive)
    if not jobs:
        session.rollback()
        return {}, []
    tenants = {job.tenant for job in jobs}
    shares = Shares(held(session, model, now), weights(session, tenants))
    lines = {tenant: deque(job for job in jobs if job.tenant == tenant) for tenant in tenants}
    left = {job.job_id: job.items for job in jobs}
    wanted: Counter[str] = Counter()
    for _ in range(limit):
        if not lines:
            break
        tenant = shares.next({t: (line[0].priority, 1) for t, line in lines.items()})
        job = lines[tenant][0]
        wanted[job.job_id] += 1
        shares.give(tenant, 1)
        left[job.job_id] -= 1
        if not left[job.job_id]:
            lines[tenant].popleft()
            if not lines[tenant]:
                del lines[tenant]
    candidates: list[int] = []
    for job in jobs:
        if wanted[job.job_id]:
            candidates += session.scalars(
                select(Item.id)
                .where(Item.job_id == job.job_id, PENDING, Item.chunk < job.released)
                .where(lease_free(now))
                .order_by(Item.chunk, Item.index)
                .limit(wanted[job.job_id])
            ).all()
    claimed = take_leases(session, [Item.id.in_(candidates)], worker, lease_seconds)
    specs = {
        job.id: job_spec(job)
        for job in session.scalars(select(Job).where(Job.id.in_({c.job_id for c in claimed})))
    }
    return specs, claimed
