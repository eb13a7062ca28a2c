"""Finding 6: some byte sequences gave 500s (encoded surrogates in JSONL, bad UTF-8 in Parquet),
NUL was accepted in CSV but refused in JSONL, a 200k-character CSV field was refused under a
500k-character prompt limit, and temperature 1e-300 failed its item with inf probabilities.

Beside the schemathesis run (tests/faults/test_fuzz.py), these are the byte-level upload cases:
each gets its own exact answer, a 4xx naming the line or row, never a 5xx.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from tests.conftest import TINY


def _parquet(column: pa.Array) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": column}), buffer)
    return buffer.getvalue()


def _unchecked_strings(*values: bytes) -> pa.Array:
    """A string column holding whatever bytes, as a broken writer would leave it."""
    ends = [0]
    for value in values:
        ends.append(ends[-1] + len(value))
    offsets = pa.array(ends, type=pa.int32()).buffers()[1]
    return pa.Array.from_buffers(
        pa.string(), len(values), [None, offsets, pa.py_buffer(b"".join(values))]
    )


GOOD = b'{"text": "fine"}\n'
CASES = [
    # (name, file bytes, expected status, expected message)
    (
        "surrogate bytes.jsonl",
        GOOD + b'{"text": "\xed\xa0\x80"}\n',
        422,
        "file: line 2: is not UTF-8 text (byte 11)",
    ),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', 422, "file: line 1: is not UTF-8 text (byte 14)"),
    ("raw nul.jsonl", b'{"text": "a\x00b"}\n', 422, "file: line 1: holds a NUL character"),
    ("escaped nul.jsonl", b'{"text": "a\\u0000b"}\n', 422, "file: line 1: holds a NUL character"),
    (
        "escaped surrogate.jsonl",
        b'{"text": "\\ud800"}\n',
        422,
        "file: line 1: holds a lone surrogate (\\ud800-\\udfff), which is not text",
    ),
    ("bom.jsonl", b"\xef\xbb\xbf" + GOOD, 202, None),
    ("empty.jsonl", b"\n\n", 422, "file: holds no rows"),
    (
        "bad.csv",
        b"text\nok\ncaf\xe9\n",
        422,
        "file: is not UTF-8 text (byte 0xe9 after row 0)",
    ),
    ("nul.csv", b"text\nok\na\x00b\n", 422, "file: row 2: holds a NUL character"),
    ("bom.csv", b"\xef\xbb\xbftext\nok\n", 202, None),
    (
        "bad.parquet",
        _parquet(_unchecked_strings(b"ok", b"\xff\xfe")),
        422,
        "file: row 2: holds text that is not UTF-8",
    ),
    (
        "nul.parquet",
        _parquet(pa.array(["ok", "a\x00b"])),
        422,
        "file: row 2: holds a NUL character",
    ),
    ("cut.parquet", _parquet(pa.array(["ok"]))[:-20], 422, None),
    ("noise.parquet", b"PAR1" + bytes(range(256)) * 4, 422, None),
]


@pytest.mark.parametrize(("name", "data", "status", "message"), CASES, ids=[c[0] for c in CASES])
def test_every_byte_sequence_gets_its_own_answer(
    client: TestClient, name: str, data: bytes, status: int, message: str | None
) -> None:
    response = client.post(
        "/v1/jobs", data={"model": TINY, "template": "Say {text}"}, files={"file": (name, data)}
    )
    assert response.status_code == status, response.text
    if message is not None:
        assert response.json()["error"]["message"] == message
    elif status == 422:
        assert response.json()["error"]["message"].startswith("file: ")


def test_a_long_csv_field_follows_the_prompt_limit(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gemma_batch.settings import get_settings

    monkeypatch.setenv("GEMMA_BATCH_MAX_ROW_BYTES", str(1 << 20))
    get_settings.cache_clear()
    note = "n" * 200_000  # kept with its row, not part of the prompt
    ok = client.post(
        "/v1/jobs",
        data={"model": TINY, "template": "Say {text}"},
        files={"file": ("rows.csv", f"text,note\nhi,{note}\n".encode())},
    )
    assert ok.status_code == 202, ok.text
    beyond = "n" * 1_200_000  # over the row limit too: the CSV reader stops it
    refused = client.post(
        "/v1/jobs",
        data={"model": TINY, "template": "Say {text}"},
        files={"file": ("rows.csv", f"text,note\nhi,{beyond}\n".encode())},
    )
    assert refused.status_code == 422
    assert refused.json()["error"]["message"].startswith(
        "file: row 1: is not valid CSV (field larger"
    )


def test_a_tiny_temperature_means_greedy(client: TestClient) -> None:
    body = {"model": TINY, "items": [{"prompt": "x"}], "params": {"temperature": 1e-300}}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202
    assert response.json()["params"]["temperature"] == 0.0
    body["params"] = {"temperature": 0.01}
    assert client.post("/v1/jobs", json=body).json()["params"]["temperature"] == 0.01
