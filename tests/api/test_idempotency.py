"""Idempotency-Key: a retried submission gets the first job back, per tenant."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item, Job
from tests.conftest import TINY, bearer


def _post(client: TestClient, key: str | None, headers: dict[str, str] | None = None) -> str:
    extra = {"Idempotency-Key": key} if key else {}
    response = client.post(
        "/v1/jobs",
        json={"model": TINY, "items": [{"prompt": "a"}, {"prompt": "b"}]},
        headers=extra | (headers or {}),
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _counts() -> tuple[int, int]:
    with session_scope() as session:
        return (
            session.scalar(select(func.count()).select_from(Job)) or 0,
            session.scalar(select(func.count()).select_from(Item)) or 0,
        )


def test_a_retry_with_the_same_key_returns_the_first_job(client: TestClient) -> None:
    first = _post(client, "order-17")
    assert _post(client, "order-17") == first
    assert _post(client, "order-18") != first
    assert _post(client, None) != _post(client, None)
    assert _counts() == (4, 8)


def test_concurrent_retries_make_one_job(client: TestClient) -> None:
    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: _post(client, "same-key"), range(8)))
    assert len(ids) == 1
    assert _counts() == (1, 2)


def test_keys_belong_to_their_tenant(client: TestClient) -> None:
    mine = _post(client, "shared-key")
    theirs = _post(client, "shared-key", bearer("other"))
    assert mine != theirs
    assert _counts() == (2, 4)


def test_a_bad_key_is_refused_by_name(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs",
        json={"model": TINY, "items": [{"prompt": "a"}]},
        headers={"Idempotency-Key": "k" * 201},
    )
    assert response.status_code == 422
    assert "Idempotency-Key" in response.text
    assert _counts() == (0, 0)
