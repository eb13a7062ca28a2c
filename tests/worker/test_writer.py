"""The result writer on a real store (worker.writer): a batch that the store refuses costs only
the job whose result it cannot hold."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from api.jobs import service as jobs
from api.jobs.schemas import JobCreate
from gemma_batch.domain.records import ItemResult
from gemma_batch.settings import get_settings
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item
from tests.conftest import TINY
from worker.writer import ResultWriter


def _job() -> str:
    request = JobCreate.model_validate({"model": TINY, "items": [{"prompt": "p"}]})
    with session_scope() as session:
        return jobs.create_job(session, request, get_settings(), "tests").id


def test_a_result_the_store_refuses_fails_only_its_own_job(
    database_url: str, model_dir: Path
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("only PostgreSQL refuses a NUL character in text")
    good, bad = _job(), _job()
    stored: list[tuple[list[object], str, bool]] = []
    given_up: list[list[object]] = []
    writer = ResultWriter(lambda *args: stored.append(args), given_up.append)
    try:
        writer.put("good owner", good, ItemResult(0, output=" fine", finish_reason="stop"))
        writer.put("bad owner", bad, ItemResult(0, output=" nul \x00", finish_reason="stop"))
        writer.flush()
    finally:
        writer.close()
    assert stored == [(["good owner"], good, False)]
    assert given_up == [["bad owner"]]
    with session_scope() as session:
        statuses = dict(session.execute(select(Item.job_id, Item.status)).tuples().all())
    assert statuses == {good: "completed", bad: "pending"}
