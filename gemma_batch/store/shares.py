"""Each tenant's share of a model's workers: what the dispatcher releases next, and what a
worker pulls next, go to the tenant holding least for its weight, sync requests before all.

A tenant's load is what it has in hand at this moment: items leased by some worker plus items
released to the broker that nobody holds yet, over its weight. While several tenants keep work
waiting, each one's load, and so its share of the throughput, tends to its weight's share.
Nothing is remembered between calls, so another API process's dispatcher carries on where one
stopped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, func, or_, select, text
from sqlalchemy.orm import Session

from gemma_batch.domain.records import INTERACTIVE_PRIORITY, OPEN_JOB_STATES
from gemma_batch.store.tables import Item, Job, Tenant

# Written out, not bound: SQLite uses the partial index of pending items only for a literal.
PENDING = text("items.status = 'pending'")


def lease_free(now: datetime) -> ColumnElement[bool]:
    return or_(Item.lease_until.is_(None), Item.lease_until < now)


@dataclass(frozen=True)
class Waiting:
    """A job's released items that no worker holds: what workers may pull now."""

    job_id: str
    tenant: str
    priority: int
    released: int  # the job's released chunks: items of later chunks are not to be pulled
    items: int


def waiting(session: Session, model: str, now: datetime, interactive: bool) -> list[Waiting]:
    """Every open job of `model` with released items nobody holds (only sync requests' with
    `interactive`), sync requests first, then the oldest."""
    # Counted per job, a correlated subquery: with the job's own `released` as a constant, each
    # count is a range of the pending index; as a join, the planner walks every pending item.
    count = (
        select(func.count())
        .select_from(Item)
        .where(Item.job_id == Job.id, PENDING, Item.chunk < Job.released, lease_free(now))
        .correlate(Job)
        .scalar_subquery()
    )
    query = (
        select(Job.id, Job.tenant, Job.priority, Job.released, count)
        .where(Job.model == model, Job.status.in_(OPEN_JOB_STATES), Job.released > 0)
        .order_by(Job.priority, Job.id)
    )
    if interactive:
        query = query.where(Job.priority == INTERACTIVE_PRIORITY)
    return [Waiting(*row) for row in session.execute(query) if row[-1]]


def held(session: Session, model: str, now: datetime) -> Counter[str]:
    """Items of `model` that some worker leases right now, by tenant."""
    rows = session.execute(
        select(Job.tenant, func.count())
        .select_from(Item)
        .join(Job, Job.id == Item.job_id)
        .where(Job.model == model, PENDING, Item.lease_until >= now)
        .group_by(Job.tenant)
    )
    return Counter(dict(rows.tuples().all()))


def weights(session: Session, tenants: set[str]) -> dict[str, int]:
    """Each tenant's weight; 1 for one with no record (jobs made while auth was off)."""
    found = dict(
        session.execute(select(Tenant.name, Tenant.weight).where(Tenant.name.in_(tenants)))
        .tuples()
        .all()
    )
    return {tenant: max(1, found.get(tenant, 1)) for tenant in tenants}


class Shares:
    """Who gets the next unit: sync requests first, then the tenant whose load per weight would
    be least once it has it (weighted fair queueing's finish time: with whole chunks or items,
    counting the unit itself keeps rounding from favouring the lighter weight)."""

    def __init__(self, load: Counter[str], weight: dict[str, int]) -> None:
        self.load, self.weight = load, weight

    def next(self, candidates: dict[str, tuple[int, int]]) -> str:
        """Of `candidates` (tenant: (the priority of its first job in line, the size of its next
        unit)), the one to serve."""
        return min(
            candidates,
            key=lambda t: (
                candidates[t][0],
                (self.load[t] + candidates[t][1]) / self.weight.get(t, 1),
                t,
            ),
        )

    def give(self, tenant: str, amount: int) -> None:
        self.load[tenant] += amount
