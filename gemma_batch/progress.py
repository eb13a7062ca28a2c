"""What a worker writes: claiming a chunk's items and storing their results, idempotently."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, select, update
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


def claim_chunk(
    session: Session, job_id: str, chunk: int, worker: str
) -> tuple[JobSpec | None, list[WorkItem]]:
    """The job's spec and the chunk's items still pending; nothing if the job is over.

    Items already done (a redelivered chunk) are skipped, so no result is computed for nothing.
    """
    job = session.get(Job, job_id)
    if job is None or job.status in FINISHED_JOB_STATES:
        return None, []
    rows = session.scalars(
        select(Item)
        .where(Item.job_id == job_id, Item.chunk == chunk, Item.status == ItemStatus.PENDING)
        .order_by(Item.index)
    ).all()
    now = utcnow()
    session.execute(
        update(Item)
        .where(Item.id.in_([row.id for row in rows]))
        .values(attempts=Item.attempts + 1, worker=worker, started_at=now)
    )
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, started_at=now)
    )
    session.commit()
    return job_spec(job), [
        WorkItem(row.index, row.prompt, row.messages, row.params) for row in rows
    ]


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
