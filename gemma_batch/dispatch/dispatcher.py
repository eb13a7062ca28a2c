"""The dispatcher: SQL holds the backlog, the broker only a window of it.

Each model's queue is kept topped up to `dispatch_window` chunks per live worker of the model
(counted in items, released but not yet taken by a worker). The next chunk released goes to the
tenant holding least for its weight (gemma_batch.store.shares), each tenant's jobs oldest first
and each job's chunks in order, so a tenant's small job waits for at most a window, never for
another tenant's whole backlog. Workers pull only from released chunks (gemma_batch.store.claims).

One dispatcher acts at a time: every API process runs the loop, and the one holding a Redis lock
does the work; another takes over within a few intervals of its loss. A submission to a model
with no other job open also tops up its queue at once, so a job on an idle fleet starts without
waiting for the loop; beside other open jobs it waits for the loop, which then releases a whole
burst of submissions in one pass.
A release is written to SQL before its message goes out: if the message never arrives, the sweep
(gemma_batch.dispatch.sweep) sends it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta

import redis
from redis.exceptions import LockError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from gemma_batch.dispatch.queues import enqueue_chunks
from gemma_batch.dispatch.sweep import sweep
from gemma_batch.domain.records import OPEN_JOB_STATES
from gemma_batch.settings import Settings
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.shares import PENDING, Shares, held, waiting, weights
from gemma_batch.store.tables import Item, Job, Worker, db_now

log = logging.getLogger(__name__)

LOCK = "gemma-batch:dispatcher"
# The lock outlives this many intervals of its holder's silence before another process takes it.
LOCK_INTERVALS = 6


@dataclass(frozen=True)
class Release:
    """A chunk whose message is to go out."""

    job_id: str
    model: str
    chunk: int
    size: int
    priority: int


def live_workers(session: Session, model: str, within: float) -> int:
    now = db_now(session)
    count = session.scalar(
        select(func.count())
        .select_from(Worker)
        .where(Worker.model == model, Worker.last_seen >= now - timedelta(seconds=within))
    )
    return count or 0


def release(session: Session, model: str, settings: Settings) -> list[Release]:
    """Release the next chunks of `model`'s jobs, fairly, until its window is full; the caller
    commits, then sends (a release is recorded before its message goes out).

    The releases are compare-and-set on each job's count, so two dispatchers racing (the loop and
    a submission) never release one chunk twice; at worst the window is briefly overfull.
    """
    now = db_now(session)
    workers = max(1, live_workers(session, model, settings.lease_seconds))
    ready = waiting(session, model, now, interactive=False)
    room = settings.dispatch_window * settings.chunk_size * workers
    room -= sum(job.items for job in ready)
    if room <= 0:
        return []
    backlog = session.execute(
        select(Job.id, Job.tenant, Job.priority, Job.released, Job.chunks)
        .where(Job.model == model, Job.status.in_(OPEN_JOB_STATES), Job.released < Job.chunks)
        .order_by(Job.priority, Job.id)
    ).all()
    if not backlog:
        return []
    tenants = {job.tenant for job in backlog}
    load = held(session, model, now)
    for job in ready:
        load[job.tenant] += job.items
    shares = Shares(load, weights(session, tenants))
    lines = {tenant: deque(job for job in backlog if job.tenant == tenant) for tenant in tenants}
    start = {job.id: job.released for job in backlog}
    upto = dict(start)
    out: list[Release] = []
    sizes: dict[tuple[str, int], int] = {}

    def size_of(job_id: str, chunk: int) -> int:
        if (job_id, chunk) not in sizes:
            sizes[(job_id, chunk)] = _pending(session, job_id, chunk)
        return sizes[(job_id, chunk)]

    while room > 0 and lines:
        heads = {t: line[0] for t, line in lines.items()}
        tenant = shares.next(
            {t: (job.priority, size_of(job.id, upto[job.id])) for t, job in heads.items()}
        )
        job = heads[tenant]
        chunk = upto[job.id]
        size = size_of(job.id, chunk)
        out.append(Release(job.id, model, chunk, size, job.priority))
        upto[job.id] = chunk + 1
        shares.give(tenant, size)
        room -= size
        if upto[job.id] == job.chunks:
            lines[tenant].popleft()
            if not lines[tenant]:
                del lines[tenant]
    lost: set[str] = set()
    for job_id, count in upto.items():
        if count == start[job_id]:
            continue
        moved = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.released == start[job_id])
            .values(released=count, dispatched_at=now)
        ).rowcount
        if not moved:  # another dispatcher released them first
            lost.add(job_id)
    return [r for r in out if r.job_id not in lost and r.size]


def _pending(session: Session, job_id: str, chunk: int) -> int:
    count = session.scalar(
        select(func.count())
        .select_from(Item)
        .where(Item.job_id == job_id, Item.chunk == chunk, PENDING)
    )
    return count or 0


def send(releases: list[Release]) -> None:
    """The messages of released chunks, one batch per job."""
    by_job: dict[str, list[Release]] = {}
    for item in releases:
        by_job.setdefault(item.job_id, []).append(item)
    for job_id, chunks in by_job.items():
        first = chunks[0]
        enqueue_chunks(job_id, first.model, [(r.chunk, r.size) for r in chunks], first.priority)


def dispatch(session: Session, settings: Settings) -> int:
    """Top up every model's queue; how many chunks were released."""
    models = session.scalars(
        select(Job.model).where(Job.status.in_(OPEN_JOB_STATES)).distinct()
    ).all()
    session.rollback()
    released = 0
    for model in models:
        releases = release(session, model, settings)
        session.commit()
        send(releases)
        released += len(releases)
    return released


class Dispatcher:
    """The loop's state in one API process: its hold on the lock, when it last swept."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = redis.Redis.from_url(settings.broker_url)
        ttl = max(1.0, LOCK_INTERVALS * settings.dispatch_interval)
        # Not thread-local: each tick runs on whichever thread asyncio lends it.
        # One lock per database: each stack sharing the broker needs a dispatcher of its own.
        self.lock = self.client.lock(
            f"{LOCK}:{settings.store_tag()}", timeout=ttl, blocking=False, thread_local=False
        )
        self.swept = 0.0

    def _lead(self) -> bool:
        """Whether this process is the dispatcher now (taking the lock, or keeping it)."""
        if self.lock.owned():
            try:
                self.lock.reacquire()
                return True
            except LockError:  # it lapsed and another process took it
                pass
        if not self.lock.acquire(blocking=False):
            return False
        log.info("this process is now the dispatcher")
        return True

    def tick(self) -> None:
        if not self._lead():
            return
        with session_scope() as session:
            dispatch(session, self.settings)
        now = time.monotonic()
        if now - self.swept >= self.settings.reconcile_interval:
            self.swept = now
            sweep(self.client, self.settings.reconcile_grace)


async def dispatch_forever(settings: Settings) -> None:
    """The dispatcher's loop (the API runs it beside the webhooks)."""
    dispatcher = Dispatcher(settings)
    while True:
        await asyncio.sleep(settings.dispatch_interval)
        try:
            await asyncio.to_thread(dispatcher.tick)
        except Exception:  # Redis or the database down: the next tick tries again
            log.exception("dispatcher tick failed")
