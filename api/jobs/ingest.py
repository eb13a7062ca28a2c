"""Rows from uploaded files, read as a stream: JSONL, CSV and Parquet, never whole in memory."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import PurePath
from typing import IO, Any

from gemma_batch.errors import FieldError, InvalidRequest

FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
PARQUET_BATCH = 5000

Row = tuple[str, dict[str, Any]]  # (where it came from, e.g. "line 3", the row's fields)


def _bad(where: str, message: str) -> InvalidRequest:
    return InvalidRequest([FieldError("file", f"{where}: {message}")])


def detect_format(filename: str | None, declared: str | None) -> str:
    if declared:
        return declared
    fmt = FORMATS.get(PurePath(filename or "").suffix.lower())
    if fmt is None:
        raise _bad(
            f"file '{filename}'",
            "cannot tell its format from the name; give format=jsonl|csv|parquet",
        )
    return fmt


def iter_rows(file: IO[bytes], fmt: str) -> Iterator[Row]:
    """Each row with where it is in the file, for error messages."""
    readers = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}
    yield from readers[fmt](file)


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _jsonl_rows(file: IO[bytes]) -> Iterator[Row]:
    for number, raw in enumerate(file, start=1):
        if not raw.strip():
            continue
        where = f"line {number}"
        try:
            row = json.loads(raw, parse_constant=_no_constants)
        except UnicodeDecodeError:
            raise _bad(where, "is not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise _bad(where, f"is not valid JSON ({exc.msg})") from None
        except ValueError as exc:  # NaN or Infinity, which no database stores as JSON
            raise _bad(where, str(exc)) from None
        except RecursionError:
            raise _bad(where, "is nested too deeply") from None
        if not isinstance(row, dict):
            raise _bad(where, f"is a JSON {type(row).__name__}, not an object")
        if b"\\u" in raw:  # escapes can spell what UTF-8 text and the databases refuse
            _check_text(where, row)
        yield where, row


def _check_text(where: str, row: dict[str, Any]) -> None:
    text = json.dumps(row, ensure_ascii=False)
    if "\x00" in text or "\\u0000" in text:
        raise _bad(where, "holds a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(where, "holds a lone surrogate (\\ud800-\\udfff), which is not text") from None


def _csv_rows(file: IO[bytes]) -> Iterator[Row]:
    text = io.TextIOWrapper(file, encoding="utf-8-sig", newline="")
    reader = csv.DictReader(text, restkey="_extra")
    number = 0  # records, not lines: a quoted value may span several lines
    try:
        for number, row in enumerate(reader, start=1):
            where = f"row {number}"
            if "_extra" in row:
                columns = len(reader.fieldnames or [])
                raise _bad(where, f"has more values than the {columns} columns")
            yield where, row
    except UnicodeDecodeError as exc:
        # Decoding runs ahead of the rows, block by block: name the byte, not a row.
        where = f"a block after row {number}"
        raise _bad("file", f"is not UTF-8 text (byte {exc.start} of {where})") from None
    except csv.Error as exc:
        raise _bad(f"row {number + 1}", f"is not valid CSV ({exc})") from None
    finally:
        if not file.closed:  # hand the upload back open to whoever owns it
            text.detach()


def _parquet_rows(file: IO[bytes]) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _bad("file", f"is not a valid Parquet file ({exc})") from None
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH):
            for row in batch.to_pylist():
                number += 1
                yield f"row {number}", {key: _jsonable(value) for key, value in row.items()}
    except (pa.ArrowException, OSError) as exc:
        raise _bad(f"row {number + 1}", f"cannot be read ({exc})") from None


def _jsonable(value: Any) -> Any:
    # Parquet carries types JSON lacks; keep their text so the row can be stored and exported.
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)  # durations, intervals and the like: their text
