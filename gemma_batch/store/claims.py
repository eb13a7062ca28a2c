"""How a worker takes items: claiming a chunk's items, leasing them, renewing the leases.

Every claim is one conditional UPDATE on pending, unleased items, so of two workers racing for
the same rows only one gets each row, and a chunk delivered twice is computed once.

A worker claims the items of each chunk delivered to it, and pulls more as its batch has room:
pending items that nobody holds, of any open job of its model, sync requests first, then the
oldest jobs. The chunks of pulled items keep their own messages in the broker: if this worker
dies, those messages (or the sweep) bring the items back once their leases lapse, and once the
items are done the messages find nothing left to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, or_, select, text, update
from sqlalchemy.orm import Session

from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import (
    FINISHED_JOB_STATES,
    INTERACTIVE_PRIORITY,
    OPEN_JOB_STATES,
    ItemStatus,
    JobStatus,
    WorkItem,
)
from gemma_batch.store.tables import Item, Job, db_now

# How many open jobs one pull looks at, in priority order.
JOBS_SCANNED = 200
# Written out, not bound: SQLite uses the partial index of pending items only for a literal.
PENDING = text("items.status = 'pending'")


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


def lease_free(now: datetime) -> ColumnElement[bool]:
    return or_(Item.lease_until.is_(None), Item.lease_until < now)


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
    """Up to `limit` pending items that nobody holds, of the open jobs of `model` (only sync
    requests' with `interactive`): sync requests first, then the oldest jobs, each job's items
    in order. Also the spec of each job they belong to.
    """
    query = (
        select(Job)
        .where(Job.model == model, Job.status.in_(OPEN_JOB_STATES))
        .order_by(Job.priority, Job.id)
        .limit(JOBS_SCANNED)
    )
    if interactive:
        query = query.where(Job.priority == INTERACTIVE_PRIORITY)
    now = db_now(session)
    specs: dict[str, JobSpec] = {}
    candidates: list[int] = []
    for job in session.scalars(query):
        wanted = limit - len(candidates)
        if wanted <= 0:
            break
        found = session.scalars(
            select(Item.id)
            .where(Item.job_id == job.id, PENDING, lease_free(now))
            .order_by(Item.index)
            .limit(wanted)
        ).all()
        if found:
            specs[job.id] = job_spec(job)
            candidates += found
    if not candidates:
        session.rollback()
        return {}, []
    return specs, take_leases(session, [Item.id.in_(candidates)], worker, lease_seconds)
