"""Small-job merging: a chunk with room left takes pending items of like small jobs into its batch.

Many small jobs (one to ten items each) arriving together would otherwise each get a model
batch of their own. Items are taken only if no worker has tried them yet, and only from open
jobs of the same model whose spec is the same (so one engine batch fits them all). Their own
chunk messages stay queued: if this worker dies, those messages bring the items back, and once
the items are done the messages find nothing left to do.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from gemma_batch.models import Item, ItemStatus, Job, JobStatus, utcnow
from gemma_batch.params import JobSpec
from gemma_batch.progress import Claimed, job_spec, lease_free, take_leases

# How many open jobs are looked at for companions (oldest first).
JOBS_SCANNED = 200
# Only jobs this small are merged: big jobs fill batches of their own, and a chunk (an
# interactive request, say) never waits on a big job's items.
SMALL_JOB = 10


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
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
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
