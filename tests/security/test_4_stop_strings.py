"""Finding 4: a 1.5 KB stop string took a worker from 1.9 to 4.4 GB (transformers' stop-string
tables, vocabulary x length). Stop strings are now limited in number and length at submit, on
every route; the worker matches them on the decoded text's tail (no tables at all).
"""

from __future__ import annotations

from fastapi.testclient import TestClient

from gemma_batch.settings import get_settings
from tests.conftest import TINY


def test_a_long_stop_string_is_refused_on_every_route(client: TestClient) -> None:
    limit = get_settings().max_stop_chars
    long = "x" * (limit + 1)
    job = {"model": TINY, "items": [{"prompt": "x"}], "params": {"stop": ["ok", long]}}
    response = client.post("/v1/jobs", json=job)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "params.stop"
    assert f"stop[1] is {limit + 1} characters, over the limit of {limit}" in error["message"]
    completion = client.post("/v1/completions", json={"model": TINY, "prompt": "x", "stop": long})
    assert completion.status_code == 400  # OpenAI-compatible routes answer 400
    assert f"over the limit of {limit}" in completion.json()["error"]["message"]
    assert client.get("/v1/jobs").json()["data"] == []


def test_more_than_eight_stop_strings_are_refused(client: TestClient) -> None:
    job = {"model": TINY, "items": [{"prompt": "x"}], "params": {"stop": list("abcdefghi")}}
    response = client.post("/v1/jobs", json=job)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "params.stop"


def test_stop_strings_at_the_limit_are_taken(client: TestClient) -> None:
    limit = get_settings().max_stop_chars
    stops = [chr(ord("a") + i) * limit for i in range(8)]
    job = {"model": TINY, "items": [{"prompt": "x"}], "params": {"stop": stops}}
    response = client.post("/v1/jobs", json=job)
    assert response.status_code == 202
    assert response.json()["params"]["stop"] == stops
