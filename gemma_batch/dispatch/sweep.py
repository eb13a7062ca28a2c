"""Re-enqueue chunks whose task was lost. SQL is the truth; Redis is only the transport.

A released chunk is stranded when it still has pending items that no live worker leases while no
message for it waits in its queue. That happens when Redis restarts without its data, when a
worker dies past redelivery (a lost machine: Redis would hand its unacknowledged chunk out again
only after the visibility timeout, an hour by default), or when the dispatcher stops between
recording a release and sending it. Sending a chunk twice is harmless (leases and pending-only
writes see to that), so the sweep need not be exact, only eventually complete. Chunks not yet
released are the dispatcher's (gemma_batch.dispatch.dispatcher), which runs the sweep.
"""

from __future__ import annotations

import base64
import json
import logging
from collections import defaultdict
from datetime import timedelta

import redis
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from gemma_batch.dispatch.queues import RUN_CHUNK, enqueue_chunks, queue_name
from gemma_batch.domain.records import OPEN_JOB_STATES, JobStatus
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.shares import PENDING, lease_free
from gemma_batch.store.tables import Item, Job, db_now

log = logging.getLogger(__name__)

# An upload still going in after this long has lost its API process (a 1M-row upload takes
# about a minute).
STALE_UPLOAD_HOURS = 6


def _chunk_of(message: dict) -> tuple[str, int] | None:  # type: ignore[type-arg]
    if message.get("headers", {}).get("task") != RUN_CHUNK:
        return None
    body = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    job_id, chunk, _size = json.loads(body)[0]
    return job_id, chunk


def chunks_in_broker(client: redis.Redis, models: set[str]) -> set[tuple[str, int]]:
    """(job, chunk) of every task message waiting in these models' queues."""
    raw: list[bytes] = []
    for model in models:
        # kombu keeps one list per priority step, named after the queue.
        for key in client.scan_iter(match=f"{queue_name(model)}*", _type="list"):
            raw.extend(client.lrange(key, 0, -1))
    # Delivered, unacknowledged messages are not counted: a worker that holds one and lives has
    # leased the chunk's items, so only a dead one's chunk can look stranded.
    messages = [json.loads(payload) for payload in raw]
    return {chunk for message in messages if (chunk := _chunk_of(message)) is not None}


def stranded(session: Session, grace: float) -> dict[tuple[str, str], dict[int, int]]:
    """Pending, unleased items of released chunks by (job, model) and chunk, of jobs whose last
    release was over `grace` ago."""
    now = db_now(session)
    jobs = session.execute(
        select(Job.id, Job.model, Job.released).where(
            Job.status.in_(OPEN_JOB_STATES),
            Job.dispatched_at < now - timedelta(seconds=grace),
            Job.released > 0,
        )
    ).all()
    found: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    for job_id, model, released in jobs:
        # One job at a time: its `released` a constant, the count is a range of the pending index.
        rows = session.execute(
            select(Item.chunk, func.count())
            .where(Item.job_id == job_id, PENDING, Item.chunk < released, lease_free(now))
            .group_by(Item.chunk)
        ).all()
        for chunk, count in rows:
            found[(job_id, model)][chunk] = count
    return found


def drop_stale_uploads(session: Session) -> None:
    """Remove jobs whose upload stopped (its API process died): they never became visible."""
    cutoff = db_now(session) - timedelta(hours=STALE_UPLOAD_HOURS)
    stale = session.execute(
        delete(Job).where(Job.status == JobStatus.UPLOADING, Job.created_at < cutoff)
    ).rowcount
    session.commit()
    if stale:
        log.warning("removed %s jobs whose upload never finished", stale)


def count_old_jobs(session: Session) -> None:
    """Jobs stored by an API process from before the dispatcher (a rolling upgrade) had every
    chunk sent at submit and record no counts: record them as all released, so that the sweep
    looks after their chunks too."""
    chunks = select(func.max(Item.chunk) + 1).where(Item.job_id == Job.id).scalar_subquery()
    session.execute(
        update(Job)
        .where(Job.status.in_(OPEN_JOB_STATES), Job.chunks == 0)
        .values(chunks=chunks, released=chunks, dispatched_at=db_now(session))
    )
    session.commit()


def sweep(client: redis.Redis, grace: float) -> int:
    """Send again every stranded chunk with no message in the broker; how many were sent."""
    with session_scope() as session:
        drop_stale_uploads(session)
        count_old_jobs(session)
        lost = stranded(session, grace)
        if not lost:
            return 0
        queued = chunks_in_broker(client, {model for _, model in lost})
        sent = 0
        for (job_id, model), chunks in lost.items():
            missing = sorted((c, n) for c, n in chunks.items() if (job_id, c) not in queued)
            if not missing:
                continue
            log.warning("job %s: re-enqueueing %s chunks whose task was lost", job_id, len(missing))
            enqueue_chunks(job_id, model, missing)
            # Its grace starts again: the message may be taken but not yet claimed.
            session.execute(
                update(Job).where(Job.id == job_id).values(dispatched_at=db_now(session))
            )
            sent += len(missing)
        session.commit()
    return sent
