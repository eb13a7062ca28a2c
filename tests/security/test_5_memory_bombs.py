"""Finding 5: memory and storage bombs. A template repeating a field, a tiny Parquet file that
unpacks into megabytes a row, one huge JSONL line, unbounded metadata, a batch file parsed whole
before its request count was checked, and uploads that skipped the size limit by their purpose.
Each is refused, naming where, before the expensive work, and nothing of the job is stored.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item, Job
from tests.conftest import TINY
from tests.security.conftest import LIMITS

ROW_LIMIT = int(LIMITS["GEMMA_BATCH_MAX_ROW_BYTES"])


def _upload(client: TestClient, name: str, data: bytes, template: str = "{text}") -> dict:
    response = client.post(
        "/v1/jobs",
        data={"model": TINY, "template": template},
        files={"file": (name, data)},
    )
    assert response.status_code == 422, response.text
    return response.json()["error"]


def _nothing_stored() -> None:
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
        assert session.scalar(select(func.count()).select_from(Item)) == 0


def test_a_template_repeating_a_field_is_measured_before_it_is_rendered(
    client: TestClient,
) -> None:
    rows = b'{"text": "fine"}\n' + json.dumps({"text": "y" * 1000}).encode() + b"\n"
    error = _upload(client, "rows.jsonl", rows, template="{text}" * 2000)
    assert error["param"] == "line 2"
    assert error["message"] == "line 2: the prompt is 2000000 characters, over the limit of 500000"
    _nothing_stored()


def test_a_parquet_file_that_unpacks_into_megabytes_a_row_is_refused(client: TestClient) -> None:
    blob = "z" * (1 << 20)  # one value, dictionary-encoded and compressed: a few bytes a row
    table = pa.table({"text": ["hi"] * 300, "unused": pa.array([blob] * 300).dictionary_encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    assert len(buffer.getvalue()) < 16 * 1024
    error = _upload(client, "rows.parquet", buffer.getvalue())
    assert error["param"] == "file"
    assert error["message"] == (
        f"file: row 1: is {(1 << 20) + 26} bytes, over the limit of {ROW_LIMIT} a row"
    )
    _nothing_stored()


def test_a_huge_jsonl_line_is_refused_without_reading_it_whole(client: TestClient) -> None:
    rows = b'{"text": "ok"}\n' + b'{"text": "' + b"a" * (ROW_LIMIT * 4) + b'"}\n'
    error = _upload(client, "rows.jsonl", rows)
    assert error["message"] == f"file: line 2: is over the limit of {ROW_LIMIT} bytes"
    _nothing_stored()


def test_metadata_is_limited(client: TestClient) -> None:
    limit = int(LIMITS["GEMMA_BATCH_MAX_METADATA_BYTES"])
    body = {"model": TINY, "items": [{"prompt": "x"}], "metadata": {"k": "v" * 2000}}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "metadata"
    assert f"metadata is 2009 bytes as JSON, over the limit of {limit}" in error["message"]
    _nothing_stored()


def _batch_line(number: int) -> bytes:
    line = {
        "custom_id": f"r{number}",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": TINY, "prompt": "hi", "max_tokens": 1},
    }
    return json.dumps(line).encode() + b"\n"


def _batch(client: TestClient, data: bytes) -> dict:
    upload = client.post(
        "/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", data)}
    ).json()
    body = {
        "input_file_id": upload["id"],
        "endpoint": "/v1/completions",
        "completion_window": "24h",
    }
    return client.post("/v1/batches", json=body).json()


def test_a_batch_file_is_counted_as_it_is_read(client: TestClient) -> None:
    # 1,000 requests against a limit of 10; line 500 is broken, but reading stops long before.
    lines = [_batch_line(n) for n in range(1000)]
    lines[499] = b"{broken\n"
    batch = _batch(client, b"".join(lines))
    assert batch["status"] == "failed"
    assert [e["code"] for e in batch["errors"]["data"]] == ["too_many_requests"]
    assert batch["errors"]["data"][0]["message"] == "more than 10 requests"


def test_a_huge_batch_line_is_refused(client: TestClient) -> None:
    batch = _batch(client, _batch_line(0) + b'{"custom_id": "' + b"x" * ROW_LIMIT + b'"}\n')
    assert batch["status"] == "failed"
    assert batch["errors"]["data"] == [
        {
            "code": "line_too_long",
            "line": 2,
            "message": f"line 2 is over the limit of {ROW_LIMIT} bytes",
            "param": None,
        }
    ]


def test_only_batch_and_user_data_files_are_uploaded(client: TestClient) -> None:
    response = client.post(
        "/v1/files", data={"purpose": "batch_output"}, files={"file": ("x.jsonl", b"{}\n")}
    )
    assert response.status_code == 400  # as OpenAI answers a bad request
    assert response.json()["error"]["param"] == "purpose"
    assert client.get("/v1/files", params={"purpose": "batch_output"}).json()["data"] == []
    # A user_data file is stored, but no batch reads it as its input.
    other = client.post(
        "/v1/files", data={"purpose": "user_data"}, files={"file": ("x.jsonl", _batch_line(1))}
    ).json()
    body = {"input_file_id": other["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
    response = client.post("/v1/batches", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "input_file_id"
    assert other["id"] not in {b["input_file_id"] for b in client.get("/v1/batches").json()["data"]}
