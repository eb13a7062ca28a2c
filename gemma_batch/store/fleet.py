"""The fleet: each worker process reports itself on every heartbeat; the API lists the live ones.

Times are the database's (db_now), like leases: a worker whose clock is off still shows as live.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from gemma_batch.store.tables import Job, Worker, db_now


@dataclass
class Report:
    """What a worker says of itself at a beat."""

    id: str
    host: str
    model: str
    device: str
    quantization: str
    items_done: int = 0
    rows_per_second: float = 0.0
    jobs: list[str] = field(default_factory=list)


def report_worker(session: Session, report: Report) -> None:
    now = db_now(session)
    values = {
        "host": report.host,
        "model": report.model,
        "device": report.device,
        "quantization": report.quantization,
        "items_done": report.items_done,
        "rows_per_second": report.rows_per_second,
        "jobs": report.jobs,
        "last_seen": now,
    }
    # One process writes its own row, so an update-or-insert cannot race.
    if not session.execute(update(Worker).where(Worker.id == report.id).values(**values)).rowcount:
        session.add(Worker(id=report.id, started_at=now, **values))
    session.commit()


def forget_worker(session: Session, worker_id: str) -> None:
    session.execute(delete(Worker).where(Worker.id == worker_id))
    session.commit()


def live_workers(session: Session, within: float) -> tuple[list[Worker], datetime]:
    """Workers heard from in the last `within` seconds, and the database's time now."""
    now = db_now(session)
    workers = session.scalars(
        select(Worker)
        .where(Worker.last_seen >= now - timedelta(seconds=within))
        .order_by(Worker.host, Worker.id)
    ).all()
    return list(workers), now


def own_jobs(session: Session, tenant: str, job_ids: set[str]) -> set[str]:
    """Those of `job_ids` that belong to `tenant`: no tenant sees what runs for another."""
    if not job_ids:
        return set()
    return set(session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.tenant == tenant)))
