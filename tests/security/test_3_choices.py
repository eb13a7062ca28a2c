"""Finding 3: `choices` had no limit: a 575 KiB list froze the API (a quadratic duplicate check on
the event loop) and then the worker. Count and total length are limited, checked in one pass.
"""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.conftest import TINY
from tests.security.conftest import LIMITS


def _submit(client: TestClient, choices: list[str]) -> dict:
    body = {"model": TINY, "items": [{"prompt": "x"}], "choices": choices}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    return response.json()["error"]


def test_too_many_choices_are_refused(client: TestClient) -> None:
    limit = int(LIMITS["GEMMA_BATCH_MAX_CHOICES"])
    # The attack's shape: a huge list of distinct choices (the old check compared every pair).
    error = _submit(client, [f"c{i}" for i in range(100_000)])
    assert error["param"] == "choices"
    assert error["message"] == f"choices: 100000 choices, over the limit of {limit}"
    assert client.get("/v1/jobs").json()["data"] == []


def test_choices_too_long_together_are_refused(client: TestClient) -> None:
    limit = int(LIMITS["GEMMA_BATCH_MAX_CHOICES_CHARS"])
    error = _submit(client, ["a" * 1500, "b" * 1500])
    assert error["param"] == "choices"
    assert f"the choices hold 3000 characters, over the limit of {limit}" in error["message"]


def test_choices_in_a_form_are_limited_too(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs",
        data={"model": TINY, "template": "{text}", "choices": ",".join(map(str, range(60)))},
        files={"file": ("rows.jsonl", b'{"text": "hi"}\n')},
    )
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "choices"
    assert "60 choices, over the limit of 50" in response.json()["error"]["message"]
