"""File uploads: bad files are refused with the line or row and the problem; nothing stored."""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item, Job
from tests.conftest import TINY

TEMPLATE = "Review: {text}\nSentiment:"


def _upload(client: TestClient, name: str, data: bytes, **form: Any) -> Any:
    fields = {"model": TINY, "template": TEMPLATE, "choices": "positive,negative"} | form
    fields = {key: value for key, value in fields.items() if value is not None}
    return client.post("/v1/jobs", data=fields, files={"file": (name, data)})


def _stored() -> tuple[int, int]:
    with session_scope() as session:
        jobs = session.scalar(select(func.count()).select_from(Job)) or 0
        items = session.scalar(select(func.count()).select_from(Item)) or 0
    return jobs, items


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


GOOD = b'{"id": 1, "text": "great"}\n'
CASES = [
    ("not json", "x.jsonl", GOOD + b"{nope\n", {}, "line 2: is not valid JSON"),
    ("not an object", "x.jsonl", GOOD + b"\n[1, 2]\n", {}, "line 3: is a JSON list, not an object"),
    ("NaN", "x.jsonl", GOOD + b'{"id": 2, "text": NaN}\n', {}, "line 2: NaN is not valid JSON"),
    (
        "surrogate",
        "x.jsonl",
        b'{"id": 1, "text": "\\ud800"}\n',
        {},
        "line 1: holds a lone surrogate",
    ),
    ("NUL", "x.jsonl", b'{"id": 1, "text": "a\\u0000b"}\n', {}, "line 1: holds a NUL character"),
    (
        "id too long",
        "x.jsonl",
        b'{"id": "' + b"x" * 300 + b'", "text": "t"}\n',
        {},
        "over 256 characters",
    ),
    ("missing field", "x.jsonl", GOOD + b'{"id": 2, "body": "x"}\n', {}, "line 2: no field 'text'"),
    ("csv missing field", "x.csv", b"id,body\n1,hello\n", {}, "row 1: no field 'text'"),
    ("csv ragged", "x.csv", b"id,text\n1,ok\n2,too,many\n", {}, "row 2: has more values"),
    (
        "csv multi-line",
        "x.csv",
        b'id,text\n1,"two\nlines"\n2,ok,extra\n',
        {},
        "row 2: has more values",
    ),
    ("not utf-8", "x.csv", b"id,text\n1,\xff\xfe\n", {}, "is not UTF-8"),
    ("bad parquet", "x.parquet", b"PAR1 not really", {}, "is not a valid Parquet file"),
    ("unknown format", "x.txt", GOOD, {}, "cannot tell its format"),
    ("empty file", "x.jsonl", b"\n\n", {}, "holds no rows"),
    ("too many rows", "x.jsonl", GOOD * 51, {}, "more rows than the limit of 50"),
    ("empty choices", "x.jsonl", GOOD, {"choices": "[]"}, "give at least one choice"),
    ("duplicate choices", "x.jsonl", GOOD, {"choices": "yes,no,yes"}, "duplicate choices: yes"),
    (
        "bad schema",
        "x.jsonl",
        GOOD,
        {"choices": None, "json_schema": '{"type": 12}'},
        "not a valid JSON Schema",
    ),
    (
        "choices and schema",
        "x.jsonl",
        GOOD,
        {"json_schema": "{}"},
        "either 'choices' or 'json_schema'",
    ),
    ("schema not json", "x.jsonl", GOOD, {"json_schema": "{"}, "is not valid JSON"),
    ("bad template", "x.jsonl", GOOD, {"template": "Review: {text"}, "not a valid template"),
    ("template field", "x.jsonl", GOOD, {"template": "Review: {0}"}, "must name a field"),
]


@pytest.mark.parametrize(
    ("name", "filename", "data", "form", "message"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_upload_is_refused_and_nothing_stored(
    client: TestClient, name: str, filename: str, data: bytes, form: dict[str, str], message: str
) -> None:
    response = _upload(client, filename, data, **form)
    assert 400 <= response.status_code < 500, response.text
    assert message in response.json()["error"]["message"]
    assert _stored() == (0, 0)


def test_rows_keep_their_fields_in_every_format(client: TestClient) -> None:
    rows = [{"id": f"r{i}", "text": f"review {i}", "stars": i} for i in range(3)]
    files = {
        "rows.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode(),
        "rows.csv": (
            "id,text,stars\n" + "".join(f"{r['id']},{r['text']},{r['stars']}\n" for r in rows)
        ).encode(),
        "rows.parquet": _parquet(rows),
    }
    for name, data in files.items():
        response = _upload(client, name, data)
        assert response.status_code == 202, response.text
        with session_scope() as session:
            job = session.get(Job, response.json()["id"])
            items = session.scalars(
                select(Item).where(Item.job_id == job.id).order_by(Item.index)
            ).all()
        assert job.columns == ["id", "text", "stars"]
        assert job.choices == ["positive", "negative"]
        assert [i.custom_id for i in items] == ["r0", "r1", "r2"]
        assert [i.prompt for i in items] == [f"Review: review {i}\nSentiment:" for i in range(3)]
        stars = [i.fields["stars"] for i in items]
        assert stars == (["0", "1", "2"] if name.endswith(".csv") else [0, 1, 2])
