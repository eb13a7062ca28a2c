"""A job's results as JSONL or CSV, streamed page by page so no job is held whole in memory."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from sqlalchemy import select

from gemma_batch.db import session_scope
from gemma_batch.models import Item, ItemStatus
from gemma_batch.schemas import ResultLine

PAGE = 1000
FIELDS = list(ResultLine.model_fields)
DONE = (ItemStatus.COMPLETED, ItemStatus.FAILED)


def iter_results(job_id: str) -> Iterator[ResultLine]:
    """Finished items in index order; while a job runs, what is done so far."""
    last = -1
    while True:
        with session_scope() as session:
            page = session.scalars(
                select(Item)
                .where(Item.job_id == job_id, Item.index > last, Item.status.in_(DONE))
                .order_by(Item.index)
                .limit(PAGE)
            ).all()
            lines = [ResultLine.of(item) for item in page]
        yield from lines
        if len(lines) < PAGE:
            return
        last = lines[-1].index


def jsonl_lines(job_id: str) -> Iterator[str]:
    for line in iter_results(job_id):
        yield line.model_dump_json() + "\n"


def csv_lines(job_id: str) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    for line in iter_results(job_id):
        writer.writerow(line.model_dump())
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()
