"""Finding 7: a Parquet export whose column changed type across rows or pages started 200 and
stopped mid-stream. Column types are now fixed from the whole upload before the first byte:
int and float make float, any other mix is written as text.
"""

from __future__ import annotations

import io
import json

import httpx
import pyarrow as pa
import pyarrow.parquet as pq

from gemma_batch.cli.stack import LocalStack
from tests.conftest import TINY

ROWS = 1001  # past the first page of an export (1,000 rows)


def _rows() -> bytes:
    lines = []
    for i in range(ROWS):
        last = i == ROWS - 1
        row = {
            "text": f"row {i}",
            "code": "x-1" if last else i,  # int on the first page, text on the second
            "score": 0.5 if last else i,  # int, then a float
            "flag": True,
            "tags": ["a", i] if i % 2 else None,  # a list: kept as JSON text
        }
        lines.append(json.dumps(row))
    return ("\n".join(lines) + "\n").encode()


def test_a_column_whose_type_changes_exports_whole(stack: LocalStack) -> None:
    client = stack.client()
    job = client.job(
        client.request(
            "POST",
            "/v1/jobs",
            data={"model": TINY, "template": "{text}", "params": json.dumps({"max_new_tokens": 1})},
            files={"file": ("rows.jsonl", _rows())},
        )["id"]
    )
    assert job.wait(poll=0.5).status == "completed"
    response = httpx.get(
        f"{stack.url}/v1/jobs/{job.id}/results",
        params={"format": "parquet"},
        headers={"Authorization": f"Bearer {stack.api_key}"},
        timeout=60,
    )
    assert response.status_code == 200
    table = pq.read_table(io.BytesIO(response.content))
    assert table.num_rows == ROWS
    types = {name: table.schema.field(name).type for name in ("code", "score", "flag", "tags")}
    assert types == {
        "code": pa.string(),
        "score": pa.float64(),
        "flag": pa.bool_(),
        "tags": pa.string(),
    }
    columns = table.to_pydict()
    assert columns["code"][:2] == ["0", "1"] and columns["code"][-1] == "x-1"
    assert columns["score"][:2] == [0.0, 1.0] and columns["score"][-1] == 0.5
    assert columns["tags"][:2] == [None, '["a", 1]']
    assert columns["status"] == ["completed"] * ROWS
