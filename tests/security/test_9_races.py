"""Finding 9: limits that did not hold under races or reuse. Ten concurrent uploads passed the
tenant's queue limit together; an Idempotency-Key reused with another body silently returned the
first job (even a cancelled one); duplicate item ids were accepted in one job.
Run on both databases: the queue limit is kept by a different lock on each.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from gemma_batch.cli.stack import LocalStack
from tests.conftest import TINY

LIMIT = 100


@pytest.fixture(scope="module")
def stack_database(module_database_url: str) -> str:
    return module_database_url


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    return {"GEMMA_BATCH_MAX_QUEUED_ITEMS": str(LIMIT)}


def _http(stack: LocalStack) -> httpx.Client:
    return httpx.Client(
        base_url=stack.url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=120
    )


def test_the_queue_limit_holds_against_concurrent_uploads(stack: LocalStack) -> None:
    stack.stop("worker")  # nothing finishes, so every accepted item stays queued
    rows = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(60)).encode()

    def upload(_: int) -> httpx.Response:
        with _http(stack) as http:
            return http.post(
                "/v1/jobs",
                data={"model": TINY, "template": "{text}"},
                files={"file": ("rows.jsonl", rows)},
            )

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(upload, range(10)))
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [202] + [429] * 9  # 60 fit under 100; a second 60 would not
    refused = next(a for a in answers if a.status_code == 429).json()["error"]
    assert (refused["queued"], refused["limit"]) == (60, LIMIT)
    with _http(stack) as http:
        listed = http.get("/v1/jobs").json()["data"]
        assert [(job["status"], job["counts"]["total"]) for job in listed] == [("queued", 60)]
        http.post(f"/v1/jobs/{listed[0]['id']}/cancel").raise_for_status()


def test_an_idempotency_key_reused_with_another_body_is_refused(stack: LocalStack) -> None:
    first = {"model": TINY, "items": [{"prompt": "one"}]}
    other = {"model": TINY, "items": [{"prompt": "two"}]}
    with _http(stack) as http:
        made = http.post("/v1/jobs", json=first, headers={"Idempotency-Key": "k-1"})
        assert made.status_code == 202
        again = http.post("/v1/jobs", json=first, headers={"Idempotency-Key": "k-1"})
        assert again.json()["id"] == made.json()["id"]
        reused = http.post("/v1/jobs", json=other, headers={"Idempotency-Key": "k-1"})
        assert reused.status_code == 422
        assert reused.json()["error"]["code"] == "idempotency_key_reused"
        assert reused.json()["error"]["param"] == "Idempotency-Key"
        # A cancelled first job does not free the key for another request either.
        http.post(f"/v1/jobs/{made.json()['id']}/cancel").raise_for_status()
        reused = http.post("/v1/jobs", json=other, headers={"Idempotency-Key": "k-1"})
        assert reused.json()["error"]["code"] == "idempotency_key_reused"
        # Uploads too: the same file again is the same job; another file under the key is not.
        form = {"model": TINY, "template": "{text}"}
        upload = {"file": ("rows.jsonl", b'{"text": "a"}\n')}
        made = http.post("/v1/jobs", data=form, files=upload, headers={"Idempotency-Key": "k-2"})
        again = http.post("/v1/jobs", data=form, files=upload, headers={"Idempotency-Key": "k-2"})
        assert again.json()["id"] == made.json()["id"]
        changed = {"file": ("rows.jsonl", b'{"text": "b"}\n')}
        reused = http.post("/v1/jobs", data=form, files=changed, headers={"Idempotency-Key": "k-2"})
        assert reused.json()["error"]["code"] == "idempotency_key_reused"


def test_duplicate_item_ids_are_refused_naming_both(stack: LocalStack) -> None:
    with _http(stack) as http:
        before = [job["id"] for job in http.get("/v1/jobs").json()["data"]]
        items = [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}]
        response = http.post("/v1/jobs", json={"model": TINY, "items": items})
        assert response.status_code == 422
        assert "items[2].id 'a' repeats items[0].id" in response.json()["error"]["message"]
        # In a file, an explicit id may also collide with a row's default id (its index).
        rows = (
            b'{"id": "k", "text": "1"}\n{"text": "2"}\n'
            b'{"id": "1", "text": "3"}\n{"id": "k", "text": "4"}\n'
        )
        response = http.post(
            "/v1/jobs",
            data={"model": TINY, "template": "{text}"},
            files={"file": ("rows.jsonl", rows)},
        )
        assert response.status_code == 422
        assert response.json()["error"]["message"] == "file: rows 1 and 4 both have the id 'k'"
        assert [job["id"] for job in http.get("/v1/jobs").json()["data"]] == before
