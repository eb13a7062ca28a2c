"""Every kind of bad job is refused with a clear 4xx that names where, and nothing is stored."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item, Job
from tests.conftest import TINY
from tests.tiny_model import CONTEXT

LONG = "word " * (CONTEXT + 10)

CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("no items", {"model": TINY, "items": []}, "items", "at least 1 item"),
    (
        "both prompt and messages",
        {
            "model": TINY,
            "items": [
                {"prompt": "ok"},
                {"prompt": "x", "messages": [{"role": "user", "content": "x"}]},
            ],
        },
        "items[1]",
        "exactly one of 'prompt' or 'messages'",
    ),
    ("neither", {"model": TINY, "items": [{"id": "a"}]}, "items[0]", "exactly one of"),
    (
        "temperature out of range",
        {"model": TINY, "items": [{"prompt": "x"}], "params": {"temperature": 3}},
        "params.temperature",
        "less than or equal to 2",
    ),
    (
        "max_new_tokens zero",
        {"model": TINY, "items": [{"prompt": "x"}], "params": {"max_new_tokens": 0}},
        "params.max_new_tokens",
        "greater than or equal to 1",
    ),
    (
        "unknown param",
        {"model": TINY, "items": [{"prompt": "x"}], "params": {"beams": 4}},
        "params.beams",
        "Extra inputs are not permitted",
    ),
    (
        "prompt longer than the context",
        {"model": TINY, "items": [{"prompt": "short"}, {"prompt": "ok"}, {"prompt": LONG}]},
        "items[2].prompt",
        f"exceeds {TINY}'s context of {CONTEXT} tokens",
    ),
    (
        "chat longer than the context",
        {"model": TINY, "items": [{"messages": [{"role": "user", "content": LONG}]}]},
        "items[0].messages",
        "exceeds",
    ),
    (
        "bad role",
        {"model": TINY, "items": [{"messages": [{"role": "robot", "content": "x"}]}]},
        "items[0].messages[0].role",
        "'system', 'user' or 'assistant'",
    ),
    (
        "duplicate ids",
        {"model": TINY, "items": [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}]},
        "items",
        "items[1].id 'a' repeats items[0].id",
    ),
]


def _stored() -> tuple[int, int]:
    with session_scope() as session:
        jobs = session.scalar(select(func.count()).select_from(Job))
        items = session.scalar(select(func.count()).select_from(Item))
    return jobs or 0, items or 0


@pytest.mark.parametrize(("name", "body", "param", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_job_is_refused_and_nothing_stored(
    client: TestClient, name: str, body: dict[str, Any], param: str, message: str
) -> None:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert message in error["message"]
    assert _stored() == (0, 0)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("gemma-99b", "unknown model 'gemma-99b'"),
        ("gemma-7b-it", "gemma-batch model prepare gemma-7b-it"),
    ],
)
def test_unknown_model_is_404_and_nothing_stored(
    client: TestClient, model: str, message: str
) -> None:
    response = client.post("/v1/jobs", json={"model": model, "items": [{"prompt": "x"}]})
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert message in error["message"]
    assert _stored() == (0, 0)


def test_body_over_the_limit_is_413(client: TestClient) -> None:
    body = {"model": TINY, "items": [{"prompt": "x" * 1000} for _ in range(200)]}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 413
    assert "larger than the limit of 100000 bytes" in response.json()["error"]["message"]
    assert _stored() == (0, 0)


def test_chunked_body_over_the_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny-gemma", "items": ['
        for _ in range(300):
            yield b'{"prompt": "' + b"x" * 1000 + b'"},'
        yield b'{"prompt": "x"}]}'

    response = client.post(
        "/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert _stored() == (0, 0)


def test_not_json_is_422(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["message"]
    assert _stored() == (0, 0)


def test_unknown_job_is_404(client: TestClient) -> None:
    for path in ("/v1/jobs/job_nope", "/v1/jobs/job_nope/results"):
        response = client.get(path)
        assert response.status_code == 404
        assert "no job 'job_nope'" in response.json()["error"]["message"]
