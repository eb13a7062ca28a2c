"""Finding 9, on the default SQLite store: one 1M-row upload made another tenant's submit fail
with "database is locked" after 30 s. Rows now go in by short transactions while the job stays
invisible; another tenant's 1-item submit answers within 5 s while a 200k-row upload runs.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from sqlalchemy import func, select

from api import auth
from gemma_batch.cli.stack import LocalStack
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item
from tests.conftest import TINY

ROWS = 200_000


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    return {"GEMMA_BATCH_MAX_ITEMS": str(ROWS)}


def _rows_stored() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Item)) or 0


def test_a_long_upload_never_blocks_another_tenants_submit(stack: LocalStack) -> None:
    stack.stop("worker")  # the machine's cores go to the upload and the submit
    rows = b"".join(b'{"text": "row %d"}\n' % i for i in range(ROWS))
    result: dict[str, httpx.Response] = {}

    def upload() -> None:
        with httpx.Client(timeout=600) as http:
            result["upload"] = http.post(
                f"{stack.url}/v1/jobs",
                data={"model": TINY, "template": "{text}"},
                files={"file": ("rows.jsonl", rows)},
                headers={"Authorization": f"Bearer {stack.api_key}"},
            )

    uploader = threading.Thread(target=upload)
    uploader.start()
    deadline = time.monotonic() + 300
    while _rows_stored() < 20_000:  # well into the upload
        assert time.monotonic() < deadline and uploader.is_alive()
        time.sleep(0.2)
    with session_scope() as session:
        other = auth.create_key(session, "other-tenant").key
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {other}"}) as http:
        submitted = http.post(
            "/v1/jobs", json={"model": TINY, "items": [{"prompt": "hi"}]}, timeout=5
        )
        assert submitted.status_code == 202, submitted.text
    assert uploader.is_alive()  # the submit was answered while the upload still ran
    # Until its rows are all in, the upload's job is in no listing.
    with httpx.Client(
        base_url=stack.url, headers={"Authorization": f"Bearer {stack.api_key}"}
    ) as http:
        assert http.get("/v1/jobs").json()["data"] == []
        uploader.join(timeout=600)
        assert result["upload"].status_code == 202, result["upload"].text
        listed = http.get("/v1/jobs").json()["data"]
        assert [(job["status"], job["counts"]["total"]) for job in listed] == [("queued", ROWS)]
