"""Finding 1: a `json_schema` `$ref` made the worker read local files and fetch any URL.

A schema may only refer inside itself: any other reference is refused at submit, naming it, and
the validator the worker runs has no way to fetch even a schema stored before this check.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from referencing.exceptions import Unresolvable

from gemma_batch.domain.json_schema import first_violation
from tests.conftest import TINY
from tests.security.conftest import Receiver


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"$ref": "file:///etc/passwd"}, "#/$ref"),
        (
            {"type": "object", "properties": {"a": {"$ref": "RECEIVER/schema"}}},
            "#/properties/a/$ref",
        ),
        (
            {"$defs": {"x": {"$id": "RECEIVER/", "type": "string"}}, "$ref": "#/$defs/x"},
            "#/$defs/x/$id",
        ),
    ],
)
def test_a_schema_that_refers_outside_itself_is_refused(
    client: TestClient, receiver: Receiver, schema: dict, where: str
) -> None:
    text = repr(schema).replace("RECEIVER", receiver.url).replace("'", '"')
    body = {
        "model": TINY,
        "items": [{"prompt": "x"}],
        "json_schema": json.loads(text),
    }
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "json_schema"
    assert f"{where} names" in error["message"]
    assert "may only refer inside itself" in error["message"]
    assert client.get("/v1/jobs").json()["data"] == []
    assert receiver.hits == []


def test_references_inside_the_schema_still_work(client: TestClient) -> None:
    schema = {
        "$defs": {"mood": {"enum": ["happy", "sad"]}},
        "type": "object",
        "properties": {"mood": {"$ref": "#/$defs/mood"}},
        "required": ["mood"],
    }
    body = {"model": TINY, "items": [{"prompt": "x"}], "json_schema": schema}
    assert client.post("/v1/jobs", json=body).status_code == 202
    assert first_violation({"mood": "happy"}, schema) is None
    assert first_violation({"mood": "angry"}, schema) == "'angry' is not one of ['happy', 'sad']"


def test_the_answer_validator_never_fetches(receiver: Receiver) -> None:
    # A schema stored before refs were checked reaches the worker's validator: it cannot fetch.
    with pytest.raises(Unresolvable):
        first_violation("x", {"$ref": f"{receiver.url}/schema"})
    with pytest.raises(Unresolvable):
        first_violation("x", {"$ref": "file:///etc/passwd"})
    assert receiver.hits == []
