"""How a worker stores results: idempotent writes that move the job's counts with them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session

from gemma_batch.domain.records import (
    FINISHED_JOB_STATES,
    OPEN_JOB_STATES,
    ItemResult,
    ItemStatus,
    JobStatus,
)
from gemma_batch.store.tables import Item, Job, db_now


def record_results(session: Session, by_job: dict[str, list[ItemResult]]) -> set[str]:
    """Store results and bump their jobs' counts in one transaction; returns the jobs that are
    over (finished, or cancelled meanwhile).

    One transaction for many jobs, so that a batch of one-item jobs costs one commit. Jobs are
    written in id order: two writers holding rows of the same jobs lock them in the same order.
    Only pending items are written, so a repeated write (a redelivered chunk) changes nothing,
    and the counts move by exactly the rows that changed.
    """
    now = db_now(session)
    for job_id in sorted(by_job):
        _record(session, job_id, by_job[job_id], now)
    session.commit()
    statuses = session.execute(select(Job.id, Job.status).where(Job.id.in_(by_job)))
    return {job_id for job_id, status in statuses if status in FINISHED_JOB_STATES}


def _record(session: Session, job_id: str, results: list[ItemResult], now: datetime) -> None:
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
            .values(status=status, finished_at=now, **result.stored())
        ).rowcount
        if status == ItemStatus.COMPLETED:
            completed += changed
        else:
            failed += changed
    done = Job.completed + completed + Job.failed + failed
    finished = (done >= Job.total) & Job.status.in_(OPEN_JOB_STATES)
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
