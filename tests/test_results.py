"""Result writes on both databases (gemma_batch.store.results): several jobs in one transaction,
each job's counts moved by exactly the rows that changed."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from api.jobs import service as jobs
from api.jobs.schemas import JobCreate
from gemma_batch.domain.records import ItemResult
from gemma_batch.settings import get_settings
from gemma_batch.store.results import record_results
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item, Job
from tests.conftest import TINY


def _job(count: int) -> str:
    request = JobCreate.model_validate(
        {"model": TINY, "items": [{"prompt": f"p{i}"} for i in range(count)]}
    )
    with session_scope() as session:
        return jobs.create_job(session, request, get_settings(), "tests").id


def test_one_write_for_several_jobs_finishes_those_it_completes(
    database_url: str, model_dir: Path
) -> None:
    done, failed, going = _job(1), _job(1), _job(2)
    batch = {
        done: [ItemResult(0, output=" a", finish_reason="stop", completion_tokens=1)],
        failed: [ItemResult(0, error="it raised")],
        going: [ItemResult(1, output=" b", finish_reason="length", completion_tokens=1)],
    }
    with session_scope() as session:
        assert record_results(session, batch) == {done, failed}
    # Written again (a redelivered chunk): nothing changes, and the finished jobs say so.
    with session_scope() as session:
        assert record_results(session, batch) == {done, failed}
        counts = {
            job.id: (job.status, job.completed, job.failed)
            for job in session.scalars(select(Job).where(Job.id.in_(batch)))
        }
        pending = session.scalars(
            select(Item.index).where(Item.job_id == going, Item.status == "pending")
        ).all()
    assert counts == {
        done: ("completed", 1, 0),
        failed: ("failed", 0, 1),
        going: ("queued", 1, 0),
    }
    assert pending == [0]
