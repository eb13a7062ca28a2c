"""What a worker writes: claiming a chunk's items and storing their results, idempotently."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, case, or_, select, update
from sqlalchemy.orm import Session

from gemma_batch.models import FINISHED_JOB_STATES, Item, ItemStatus, Job, JobStatus, utcnow
from gemma_batch.params import GenerationParams, JobSpec


@dataclass(frozen=True)
class WorkItem:
    index: int
    prompt: str | None
    messages: list[dict[str, Any]] | None
    params: dict[str, Any] | None = None


@dataclass(frozen=True)
class ItemResult:
    index: int
    output: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    label: str | None = None
    label_probs: dict[str, float] | None = None


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


def record_results(session: Session, job_id: str, results: list[ItemResult]) -> bool:
    """Store results and bump the job's counts in one transaction; True while the job goes on.

    Only pending items are written, so a repeated write (a redelivered chunk) changes nothing,
    and the counts move by exactly the rows that changed.
    """
    now = utcnow()
    completed = failed = 0
    for result in results:
        status = ItemStatus.FAILED if result.error else ItemStatus.COMPLETED
        changed = session.execute(
            update(Item)
            .where(
                Item.job_id == job_id,
                Item.index == result.index,
                Item.status == ItemStatus.PENDING,
            )
            .values(
                status=status,
                output=result.output,
                finish_reason=result.finish_reason,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                error=result.error,
                label=result.label,
                label_probs=result.label_probs,
                finished_at=now,
            )
        ).rowcount
        if status == ItemStatus.COMPLETED:
            completed += changed
        else:
            failed += changed
    done = Job.completed + completed + Job.failed + failed
    finished = (done >= Job.total) & Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            completed=Job.completed + completed,
            failed=Job.failed + failed,
            # The write that finishes the last item closes the job, in the same statement,
            # so two workers finishing together cannot both miss it.
            status=case(
                (finished & (Job.failed + failed >= Job.total), JobStatus.FAILED),
                (finished, JobStatus.COMPLETED),
                else_=Job.status,
            ),
            finished_at=case((finished, now), else_=Job.finished_at),
        )
    )
    session.commit()
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    return status not in FINISHED_JOB_STATES
