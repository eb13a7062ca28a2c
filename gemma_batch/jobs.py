"""Job services used by the API and the CLI: create, read, list and cancel jobs."""

from __future__ import annotations

import logging

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from gemma_batch.chat import gemma_turns
from gemma_batch.errors import Conflict, FieldError, InvalidRequest, NotFound, ServiceUnavailable
from gemma_batch.model_cache import get_prepared
from gemma_batch.models import FINISHED_JOB_STATES, Item, ItemStatus, Job, JobStatus, utcnow
from gemma_batch.queue import enqueue_chunks
from gemma_batch.schemas import ItemIn, JobCreate
from gemma_batch.settings import Settings

log = logging.getLogger(__name__)


def _check_context(request: JobCreate, settings: Settings) -> None:
    """Refuse prompts that, with the tokens asked for, would not fit the model's context."""
    model = get_prepared(settings.model_dir, request.model)
    texts = [item.prompt if item.prompt is not None else _chat_text(item) for item in request.items]
    limit = model.context_length
    wanted = request.params.max_new_tokens
    errors = [
        FieldError(
            f"items[{index}].{'prompt' if item.prompt is not None else 'messages'}",
            f"the prompt is {tokens} tokens; with max_new_tokens {wanted} it exceeds "
            f"{request.model}'s context of {limit} tokens",
        )
        for index, (item, tokens) in enumerate(
            zip(request.items, model.count_tokens(texts), strict=True)
        )
        if tokens + wanted > limit
    ]
    if errors:
        raise InvalidRequest(errors)


def _chat_text(item: ItemIn) -> str:
    assert item.messages is not None
    return gemma_turns([m.model_dump() for m in item.messages])


def create_job(session: Session, request: JobCreate, settings: Settings) -> Job:
    """Store the job and all its items in one transaction, then enqueue one task per chunk."""
    _check_context(request, settings)
    job = Job(
        model=request.model,
        params=request.params.model_dump(),
        total=len(request.items),
        meta=request.metadata,
    )
    session.add(job)
    session.flush()
    size = settings.chunk_size
    session.execute(
        insert(Item),
        [
            {
                "job_id": job.id,
                "index": index,
                "chunk": index // size,
                "custom_id": item.id if item.id is not None else str(index),
                "prompt": item.prompt,
                "messages": None
                if item.messages is None
                else [m.model_dump() for m in item.messages],
            }
            for index, item in enumerate(request.items)
        ],
    )
    session.commit()
    sizes = [min(size, job.total - start) for start in range(0, job.total, size)]
    try:
        enqueue_chunks(job.id, job.model, sizes)
    except Exception as exc:  # kombu raises several kinds for an unreachable broker
        # Nothing half-done stays behind: the job is removed and the caller may simply retry.
        log.error("broker unreachable, dropping job %s: %s", job.id, exc)
        session.execute(delete(Job).where(Job.id == job.id))
        session.commit()
        raise ServiceUnavailable(
            f"the job queue is unreachable ({exc}); nothing was stored"
        ) from exc
    log.info("job %s: %s items in %s chunks for %s", job.id, job.total, len(sizes), job.model)
    return job


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job '{job_id}'", "job_id")
    return job


def list_jobs(session: Session, limit: int, after: str | None) -> tuple[list[Job], bool]:
    """Newest first; `after` is the last id of the previous page."""
    query = select(Job).order_by(Job.id.desc()).limit(limit + 1)
    if after:
        query = query.where(Job.id < after)
    jobs = list(session.scalars(query))
    return jobs[:limit], len(jobs) > limit


def cancel_job(session: Session, job_id: str) -> Job:
    """Stop a job: pending items are cancelled, finished ones stay downloadable."""
    job = get_job(session, job_id)
    if job.status in FINISHED_JOB_STATES:
        raise Conflict(f"job '{job_id}' is already {job.status}", "job_id")
    session.execute(
        update(Item)
        .where(Item.job_id == job_id, Item.status == ItemStatus.PENDING)
        .values(status=ItemStatus.CANCELLED)
    )
    job.status = JobStatus.CANCELLED
    job.finished_at = utcnow()
    session.commit()
    return job
