"""Where /v1/files keeps contents (api.openai.filestore), each against its real server.

- S3: a real S3-protocol server (moto's server mode) on 127.0.0.1, started here; the API in
  process sends its requests with boto3, as it would to AWS or MinIO.
- SQL (the default): a 500 MB file goes in and comes out of a real `gemma-batch api` process on
  PostgreSQL, byte for byte, while the process's memory grows by less than 100 MB.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import psutil
import pytest
from botocore.exceptions import ClientError
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api import auth
from api.main import create_app
from gemma_batch.cli.stack import _die_with_parent, free_port
from gemma_batch.settings import get_settings
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import FileBlock
from tests.conftest import TINY, _postgres_database, _use_database, bearer, wait_for

BUCKET = "gemma-files"
MiB = 1 << 20


@pytest.fixture
def s3_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server on a spare port, and boto3's settings pointing at it."""
    port = free_port()
    log = (tmp_path / "moto.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            try:
                return httpx.get(url, timeout=1).status_code < 500
            except httpx.TransportError:
                return False

        wait_for(answers, 60, lambda: (tmp_path / "moto.log").read_text(), 0.2)
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield url
    finally:
        server.terminate()
        server.wait(10)


def _batch_line(index: int) -> bytes:
    body = {"model": TINY, "messages": [{"role": "user", "content": f"Say {index}"}]}
    line = {"custom_id": f"r{index}", "method": "POST", "url": "/v1/chat/completions", "body": body}
    return json.dumps(line).encode() + b"\n"


def test_s3_file_store_keeps_contents_in_the_bucket(
    s3_server: str, sqlite_url: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMMA_BATCH_FILES_URL", f"s3://{BUCKET}/team/files")
    monkeypatch.setenv("GEMMA_BATCH_MAX_FILE_BYTES", str(40 * MiB))
    get_settings.cache_clear()
    s3 = boto3.client("s3")
    a = bearer("s3-tenant")
    # 20 MiB of batch lines: more than one part of a multipart upload.
    lines = b"".join(_batch_line(i) for i in range(3))
    padding = b"\n" * (20 * MiB - len(lines))
    contents = lines + padding
    with TestClient(create_app()) as client:
        upload = client.post(
            "/v1/files",
            files={"file": ("big.jsonl", contents)},
            data={"purpose": "batch"},
            headers=a,
        )
        assert upload.status_code == 200, upload.text
        file_id = upload.json()["id"]
        assert upload.json()["bytes"] == len(contents)
        stored = s3.head_object(Bucket=BUCKET, Key=f"team/files/{file_id}")
        assert stored["ContentLength"] == len(contents)
        assert [k["Key"] for k in s3.list_objects_v2(Bucket=BUCKET)["Contents"]] == [
            f"team/files/{file_id}"
        ]

        back = client.get(f"/v1/files/{file_id}/content", headers=a)
        assert back.status_code == 200
        assert back.content == contents
        assert back.headers["content-disposition"] == 'attachment; filename="big.jsonl"'

        # A batch reads its input from the bucket.
        body = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        batch = client.post("/v1/batches", json=body, headers=a)
        assert batch.status_code == 200, batch.text
        assert batch.json()["request_counts"]["total"] == 3

        # Too big: refused, and no object or unfinished multipart upload is left behind.
        refused = client.post(
            "/v1/files",
            files={"file": ("huge.jsonl", b"x" * (41 * MiB))},
            data={"purpose": "batch"},
            headers=a,
        )
        assert refused.status_code == 413, refused.text
        assert len(s3.list_objects_v2(Bucket=BUCKET)["Contents"]) == 1
        assert not s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads")

        assert client.delete(f"/v1/files/{file_id}", headers=a).status_code == 200
        with pytest.raises(ClientError, match="404"):
            s3.head_object(Bucket=BUCKET, Key=f"team/files/{file_id}")
    get_settings.cache_clear()


# --- 500 MB through the SQL store ---------------------------------------------------------

BIG = 500 * MiB


def _big_blocks() -> Iterator[bytes]:
    """500 MB that no block repeats (each MiB starts with its number), made as it is sent."""
    seed = hashlib.sha256(b"gemma-batch").digest() * (MiB // 32)
    for number in range(BIG // MiB):
        yield number.to_bytes(8, "big") + seed[8:]


class _Peak(threading.Thread):
    """The largest resident memory of a process, sampled every 50 ms until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process, self.peak, self.running = psutil.Process(pid), 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.05)

    def stop(self) -> int:
        self.running = False
        self.join()
        return self.peak


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from _use_database(_postgres_database)


def test_a_500_mb_file_goes_through_the_sql_store_in_bounded_memory(
    postgres_url: str, tmp_path: Path
) -> None:
    with session_scope() as session:
        key = auth.create_key(session, "big-files").key
    port = free_port()
    env = os.environ | {
        "GEMMA_BATCH_DATABASE_URL": postgres_url,
        "GEMMA_BATCH_MAX_FILE_BYTES": str(BIG + MiB),
        "GEMMA_BATCH_FILES_URL": "sql",
    }
    log = (tmp_path / "api.log").open("wb")
    api = subprocess.Popen(
        [sys.executable, "-m", "gemma_batch", "api", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(base), 60, lambda: (tmp_path / "api.log").read_text(), 0.2)
        headers = {"Authorization": f"Bearer {key}"}
        http = httpx.Client(base_url=base, headers=headers, timeout=600)
        source = tmp_path / "big.bin"
        sent = hashlib.sha256()
        with source.open("wb") as out:
            for block in _big_blocks():
                sent.update(block)
                out.write(block)
        baseline = psutil.Process(api.pid).memory_info().rss
        peak = _Peak(api.pid)
        peak.start()
        started = time.monotonic()
        with source.open("rb") as handle:
            upload = http.post(
                "/v1/files", files={"file": ("big.bin", handle)}, data={"purpose": "user_data"}
            )
        uploaded = time.monotonic() - started
        assert upload.status_code == 200, upload.text
        assert upload.json()["bytes"] == BIG
        source.unlink()
        got, size = hashlib.sha256(), 0
        started = time.monotonic()
        with http.stream("GET", f"/v1/files/{upload.json()['id']}/content") as response:
            assert response.status_code == 200
            assert response.headers["content-length"] == str(BIG)
            for block in response.iter_bytes(MiB):
                got.update(block)
                size += len(block)
        downloaded = time.monotonic() - started
        growth = (peak.stop() - baseline) / MiB
        print(
            f"\n500 MB through the SQL file store: upload {uploaded:.1f} s, download "
            f"{downloaded:.1f} s, the API's memory grew {growth:.1f} MB at most"
        )
        assert size == BIG
        assert got.hexdigest() == sent.hexdigest()
        assert growth < 100, f"the API's memory grew {growth:.0f} MB"
        assert http.delete(f"/v1/files/{upload.json()['id']}").status_code == 200
        with session_scope() as session:  # the blocks went with the record
            assert session.scalar(select(func.count()).select_from(FileBlock)) == 0
    finally:
        api.terminate()
        api.wait(30)


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
