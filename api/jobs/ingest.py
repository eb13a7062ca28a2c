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
# Rows decoded at once: small, since a few bytes of Parquet can unpack into megabytes a row.
PARQUET_BATCH = 64

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


def iter_rows(file: IO[bytes], fmt: str, max_row_bytes: int, max_field_chars: int) -> Iterator[Row]:
    """Each row with where it is in the file, for error messages.

    Whatever the format, a row is UTF-8 text without NUL characters (which no database column
    of text holds), and no JSONL line may be over `max_row_bytes`.
    """
    if fmt == "jsonl":
        yield from _jsonl_rows(file, max_row_bytes)
    elif fmt == "csv":
        yield from _csv_rows(file, max_field_chars)
    else:
        yield from _parquet_rows(file)


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _lines(file: IO[bytes], limit: int) -> Iterator[tuple[int, bytes]]:
    number = 0
    while raw := file.readline(limit + 1):
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            raise _bad(f"line {number}", f"is over the limit of {limit} bytes")
        yield number, raw


def _jsonl_rows(file: IO[bytes], limit: int) -> Iterator[Row]:
    for number, raw in _lines(file, limit):
        if not raw.strip():
            continue
        where = f"line {number}"
        try:
            # Strict decoding: json.loads(bytes) would let encoded surrogates through. A byte
            # order mark may open the file, as some editors write one.
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise _bad(where, f"is not UTF-8 text (byte {exc.start + 1})") from None
        if "\x00" in text:
            raise _bad(where, "holds a NUL character")
        try:
            row = json.loads(text, parse_constant=_no_constants)
        except json.JSONDecodeError as exc:
            raise _bad(where, f"is not valid JSON ({exc.msg})") from None
        except ValueError as exc:  # NaN or Infinity, which no database stores as JSON
            raise _bad(where, str(exc)) from None
        except RecursionError:
            raise _bad(where, "is nested too deeply") from None
        if not isinstance(row, dict):
            raise _bad(where, f"is a JSON {type(row).__name__}, not an object")
        if "\\u" in text:  # escapes can spell what UTF-8 text and the databases refuse
            _check_escapes(where, row)
        yield where, row


def _check_escapes(where: str, row: dict[str, Any]) -> None:
    problem = text_problem(json.dumps(row, ensure_ascii=False))
    if problem:
        raise _bad(where, problem)


def text_problem(text: str) -> str | None:
    """What keeps decoded JSON from being stored as text: NUL, or a lone surrogate."""
    if "\x00" in text or "\\u0000" in text:
        return "holds a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds a lone surrogate (\\ud800-\\udfff), which is not text"
    return None


def _check_plain(where: str, row: dict[str, Any]) -> None:
    if any(isinstance(v, str) and "\x00" in v for v in (*row.keys(), *row.values())):
        raise _bad(where, "holds a NUL character")


def _csv_rows(file: IO[bytes], max_field_chars: int) -> Iterator[Row]:
    # A process-wide setting of the csv module; every upload sets the same value.
    csv.field_size_limit(max_field_chars)
    text = io.TextIOWrapper(file, encoding="utf-8-sig", newline="")
    reader = csv.DictReader(text, restkey="_extra")
    number = 0  # records, not lines: a quoted value may span several lines
    try:
        for number, row in enumerate(reader, start=1):
            where = f"row {number}"
            if "_extra" in row:
                columns = len(reader.fieldnames or [])
                raise _bad(where, f"has more values than the {columns} columns")
            _check_plain(where, row)
            yield where, row
    except UnicodeDecodeError as exc:
        # Decoding runs ahead of the rows, block by block: the first bad row is the next one
        # or a little later.
        raise InvalidRequest(
            [
                FieldError(
                    "file",
                    f"is not UTF-8 text (byte {exc.object[exc.start]:#04x} after row {number})",
                )
            ]
        ) from None
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
            for row in _decoded(batch, number):
                number += 1
                where = f"row {number}"
                row = {key: _jsonable(value) for key, value in row.items()}
                _check_plain(where, row)
                yield where, row
    except (pa.ArrowException, OSError) as exc:
        raise _bad(f"row {number + 1}", f"cannot be read ({exc})") from None


def _decoded(batch: Any, before: int) -> list[dict[str, Any]]:
    """The batch's rows as Python values; a string column holding bad UTF-8 is named by row."""
    try:
        return batch.to_pylist()  # type: ignore[no-any-return]
    except UnicodeDecodeError:
        for offset in range(batch.num_rows):
            try:
                batch.slice(offset, 1).to_pylist()
            except UnicodeDecodeError:
                raise _bad(f"row {before + offset + 1}", "holds text that is not UTF-8") from None
        raise


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
