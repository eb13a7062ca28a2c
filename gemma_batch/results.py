"""A job's results as JSONL, CSV or Parquet: each finished item joined to its original fields.

Streamed page by page, so no job is ever held whole in memory, and available while the job
runs (what is done so far).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from sqlalchemy import select

from gemma_batch.db import session_scope
from gemma_batch.models import Item, ItemStatus, Job
from gemma_batch.schemas import ResultLine

PAGE = 1000
RESULT_FIELDS = list(ResultLine.model_fields)
DONE = (ItemStatus.COMPLETED, ItemStatus.FAILED)


def item_pages(job_id: str, statuses: Sequence[str]) -> Iterator[list[Item]]:
    """A job's items in these states, in index order, a page at a time (each its own session)."""
    last = -1
    while True:
        with session_scope() as session:
            page = session.scalars(
                select(Item)
                .where(Item.job_id == job_id, Item.index > last, Item.status.in_(statuses))
                .order_by(Item.index)
                .limit(PAGE)
            ).all()
        if page:
            yield list(page)
        if len(page) < PAGE:
            return
        last = page[-1].index


def iter_pages(job_id: str) -> Iterator[list[dict[str, Any]]]:
    """Finished items in index order, a page at a time, as export rows."""
    for items in item_pages(job_id, DONE):
        # Original fields first; a field named like a result column is shown the result.
        yield [(item.fields or {}) | ResultLine.of(item).model_dump() for item in items]


def columns(job: Job) -> list[str]:
    original = job.columns or []
    return original + [name for name in RESULT_FIELDS if name not in original]


class Export(Protocol):
    media_type: str

    def write(self, job: Job) -> Iterator[bytes]: ...


class JsonlExport:
    media_type = "application/x-ndjson"

    def write(self, job: Job) -> Iterator[bytes]:
        for page in iter_pages(job.id):
            yield "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in page).encode()


class CsvExport:
    media_type = "text/csv"

    def write(self, job: Job) -> Iterator[bytes]:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns(job), extrasaction="ignore")
        writer.writeheader()
        for page in iter_pages(job.id):
            for row in page:
                probs = row.get("label_probs")
                writer.writerow(row | {"label_probs": json.dumps(probs) if probs else None})
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
        yield buffer.getvalue().encode()


class _Chunks(io.RawIOBase):
    """A write-only file for pyarrow whose bytes are taken away as they are written."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[bytes] = []
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.parts.append(bytes(data))
        self.written += len(data)
        return len(data)

    def tell(self) -> int:
        return self.written

    def take(self) -> bytes:
        data, self.parts[:] = b"".join(self.parts), []
        return data


class ParquetExport:
    media_type = "application/vnd.apache.parquet"

    def write(self, job: Job) -> Iterator[bytes]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = _Chunks()
        writer = None
        names = columns(job)
        # Our own columns have fixed types, whatever the first rows hold.
        fixed = {
            "id": pa.string(), "index": pa.int64(), "status": pa.string(), "output": pa.string(),
            "label": pa.string(), "label_probs": pa.string(), "finish_reason": pa.string(),
            "prompt_tokens": pa.int64(), "completion_tokens": pa.int64(), "error": pa.string(),
        }  # fmt: skip
        for page in iter_pages(job.id):
            rows = [{name: row.get(name) for name in names} for row in page]
            for row in rows:
                probs = row.get("label_probs")
                row["label_probs"] = json.dumps(probs) if probs else None
            if writer is None:
                # The caller's fields take the types of the first page; still empty there: text.
                inferred = pa.Table.from_pylist(rows).schema
                schema = pa.schema(
                    [
                        pa.field(f.name, fixed[f.name])
                        if f.name in fixed
                        else f.with_type(pa.string())
                        if pa.types.is_null(f.type)
                        else f
                        for f in inferred
                    ]
                )
                writer = pq.ParquetWriter(sink, schema)
            writer.write_table(pa.Table.from_pylist(rows, schema=writer.schema))
            yield sink.take()
        if writer is None:
            empty = pa.schema([pa.field(name, pa.string()) for name in names])
            writer = pq.ParquetWriter(sink, empty)
        writer.close()
        yield sink.take()


EXPORTS: dict[str, Export] = {
    "jsonl": JsonlExport(),
    "csv": CsvExport(),
    "parquet": ParquetExport(),
}
