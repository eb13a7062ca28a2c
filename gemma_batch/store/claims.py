"""How a worker takes items: claiming a chunk's items, leasing them, renewing the leases.

Every claim is one conditional UPDATE on pending, unleased items, so of two workers racing for
the same rows only one gets each row, and a chunk delivered twice is computed once.

Small-job merging: a chunk with room left takes pending items of like small jobs into its batch.
Many small jobs (one to ten items each) arriving together would otherwise each get a model
batch of their own. Items are taken only if no worker has tried them yet, and only from open
jobs of the same model whose spec is the same (so one engine batch fits them all). Their own
chunk messages stay queued: if this worker dies, those messages bring the items back, and once
the items are done the messages find nothing left to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session

from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import (
    FINISHED_JOB_STATES,
    OPEN_JOB_STATES,
    ItemStatus,
    JobStatus,
    WorkItem,
)
from gemma_batch.store.tables import Item, Job, utcnow

# How many open jobs are looked at for companions (oldest first).
JOBS_SCANNED = 200
# Only jobs this small are merged: big jobs fill batches of their own, and a chunk (an
# interactive request, say) never waits on a big job's items.
SMALL_JOB = 10


def job_spec(job: Job) -> JobSpec:
    return JobSpec(
        params=GenerationParams.model_validate(job.params),
        prefix=job.prefix or "",
        chat=job.chat,
        choices=job.choices,
        json_schema=job.json_schema,
    )


@dataclass(frozen=True)
class Claimed:
    """An item a worker holds the lease on, with how many runs it has started before."""

    job_id: str
    item_id: int
    attempts: int
    item: WorkItem


def lease_free(now: datetime) -> ColumnElement[bool]:
    return or_(Item.lease_until.is_(None), Item.lease_until < now)


def take_leases(
    session: Session, where: list[ColumnElement[bool]], worker: str, lease_seconds: float
) -> list[Claimed]:
    """Lease the pending items matching `where` that no live worker holds.

    One conditional UPDATE: of two workers racing for the same rows, only one gets each row.
    """
    now = utcnow()
    ids = session.scalars(
        update(Item)
        .where(*where, Item.status == ItemStatus.PENDING, lease_free(now))
        .values(worker=worker, lease_until=now + timedelta(seconds=lease_seconds))
        .returning(Item.id)
    ).all()
    rows = session.scalars(
        select(Item).where(Item.id.in_(ids)).order_by(Item.job_id, Item.index)
    ).all()
    session.execute(
        update(Job)
        .where(Job.id.in_({row.job_id for row in rows}), Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, started_at=now)
    )
    session.commit()
    return [
        Claimed(
            row.job_id,
            row.id,
            row.attempts,
            WorkItem(row.index, row.prompt, row.messages, row.params),
        )
        for row in rows
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
        .values(attempts=Item.attempts + 1, started_at=utcnow())
    )
    session.commit()


def renew_leases(session: Session, item_ids: list[int], worker: str, lease_seconds: float) -> None:
    session.execute(
        update(Item)
        .where(Item.id.in_(item_ids), Item.worker == worker, Item.status == ItemStatus.PENDING)
        .values(lease_until=utcnow() + timedelta(seconds=lease_seconds))
    )
    session.commit()


def claim_companions(
    session: Session,
    model: str,
    spec: JobSpec,
    own_job: str,
    room: int,
    worker: str,
    lease_seconds: float,
) -> list[Claimed]:
    """Up to `room` untried, unleased pending items of other open jobs like this one."""
    jobs = session.scalars(
        select(Job)
        .where(
            Job.model == model,
            Job.id != own_job,
            Job.total <= SMALL_JOB,
            Job.status.in_(OPEN_JOB_STATES),
        )
        .order_by(Job.id)
        .limit(JOBS_SCANNED)
    ).all()
    alike = [job.id for job in jobs if job_spec(job) == spec]
    if not alike or room <= 0:
        return []
    # Only untried items: one that was in a batch that killed its worker runs alone instead.
    # (An item's attempts only grow under a lease, which take_leases checks again row by row.)
    candidates = (
        select(Item.id)
        .where(
            Item.job_id.in_(alike),
            Item.status == ItemStatus.PENDING,
            Item.attempts == 0,
            lease_free(utcnow()),
        )
        .order_by(Item.job_id, Item.index)
        .limit(room)
    )
    return take_leases(session, [Item.id.in_(candidates.scalar_subquery())], worker, lease_seconds)
