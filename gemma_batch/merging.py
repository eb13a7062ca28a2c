"""Small-job merging: a chunk with room left takes pending items of like small jobs into its batch.

Many small jobs (one to ten items each) arriving together would otherwise each get a model
batch of their own. Items are taken only if no worker has tried them yet, and only from open
jobs of the same model whose spec is the same (so one engine batch fits them all). Their own
chunk messages stay queued: if this worker dies, those messages bring the items back, and once
the items are done the messages find nothing left to do.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from gemma_batch.models import Item, ItemStatus, Job, JobStatus, utcnow
from gemma_batch.params import JobSpec
from gemma_batch.progress import WorkItem, job_spec

# How many open jobs are looked at for companions (oldest first).
JOBS_SCANNED = 200
# Only jobs this small are merged: big jobs fill batches of their own, and a chunk (an
# interactive request, say) never waits on a big job's items.
SMALL_JOB = 10


def claim_companions(
    session: Session, model: str, spec: JobSpec, own_job: str, room: int, worker: str
) -> list[tuple[str, WorkItem]]:
    """Up to `room` untried pending items of other open jobs like this one, claimed for `worker`."""
    jobs = session.scalars(
        select(Job)
        .where(
            Job.model == model,
            Job.id != own_job,
            Job.total <= SMALL_JOB,
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
        )
        .order_by(Job.id)
        .limit(JOBS_SCANNED)
    ).all()
    alike = [job.id for job in jobs if job_spec(job) == spec]
    if not alike or room <= 0:
        return []
    candidates = session.scalars(
        select(Item.id)
        .where(Item.job_id.in_(alike), Item.status == ItemStatus.PENDING, Item.attempts == 0)
        .order_by(Item.job_id, Item.index)
        .limit(room)
    ).all()
    now = utcnow()
    # Conditional on attempts == 0, so two workers never take the same item this way.
    claimed = session.scalars(
        update(Item)
        .where(Item.id.in_(candidates), Item.attempts == 0)
        .values(attempts=Item.attempts + 1, worker=worker, started_at=now)
        .returning(Item.id)
    ).all()
    rows = session.scalars(
        select(Item).where(Item.id.in_(claimed)).order_by(Item.job_id, Item.index)
    ).all()
    session.execute(
        update(Job)
        .where(Job.id.in_({row.job_id for row in rows}), Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, started_at=now)
    )
    session.commit()
    return [(row.job_id, WorkItem(row.index, row.prompt, row.messages, row.params)) for row in rows]
