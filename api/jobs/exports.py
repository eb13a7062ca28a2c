"""A job's results as JSONL, CSV or Parquet: each finished item joined to its original fields.

Streamed page by page, so no job is ever held whole in memory, and available while the job
runs (what is done so far).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any, Protocol

from api.jobs.schemas import ResultLine, result_line
from api.paging import item_pages
from gemma_batch.domain.records import ItemStatus
from gemma_batch.store.tables import Job

RESULT_COLUMNS = list(ResultLine.model_fields)
DONE = (ItemStatus.COMPLETED, ItemStatus.FAILED)


def iter_pages(job_id: str) -> Iterator[list[dict[str, Any]]]:
    """Finished items in index order, a page at a time, as export rows."""
    for items in item_pages(job_id, DONE):
        # Original fields first; a field named like a result column is shown the result.
        yield [(item.fields or {}) | result_line(item) for item in items]


def columns(job: Job) -> list[str]:
    original = job.columns or []
    return original + [name for name in RESULT_COLUMNS if name not in original]


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
                # Structured values (label probabilities, logprobs, the caller's lists) as JSON.
                writer.writerow(
                    {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in row.items()}
                )
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


def _parquet_schema(job: Job) -> Any:
    """Every column's type fixed before the first byte: ours from ResultLine, the caller's from
    the types its rows held over the whole upload (text where they were mixed or unknown)."""
    import pyarrow as pa

    def ours(annotation: Any) -> Any:
        return pa.int64() if annotation in (int, int | None) else pa.string()

    fixed = {name: ours(field.annotation) for name, field in ResultLine.model_fields.items()}
    kinds = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
    seen = job.column_types or {}
    return pa.schema(
        [
            pa.field(name, fixed[name] if name in fixed else kinds.get(seen.get(name), pa.string()))
            for name in columns(job)
        ]
    )


def _cell(value: Any, kind: Any) -> Any:
    import pyarrow as pa

    if value is None:
        return None
    if pa.types.is_string(kind) and not isinstance(value, str):
        return (
            json.dumps(value, ensure_ascii=False) if isinstance(value, list | dict) else str(value)
        )
    if pa.types.is_floating(kind):
        return float(value)
    return value


class ParquetExport:
    media_type = "application/vnd.apache.parquet"

    def write(self, job: Job) -> Iterator[bytes]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = _Chunks()
        schema = _parquet_schema(job)
        writer = pq.ParquetWriter(sink, schema)
        for page in iter_pages(job.id):
            rows = [
                {field.name: _cell(row.get(field.name), field.type) for field in schema}
                for row in page
            ]
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            yield sink.take()
        writer.close()
        yield sink.take()


EXPORTS: dict[str, Export] = {
    "jsonl": JsonlExport(),
    "csv": CsvExport(),
    "parquet": ParquetExport(),
}
