"""Fault 7: one tenant cannot see another's work, and no /v1 route answers without a key.

Light: the API in process on each kind of database, no worker.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient

from api.main import create_app
from gemma_batch.settings import get_settings
from tests.conftest import TINY, bearer

SECRET = "tenant A's private prompt"


@pytest.fixture
def app_client(database_url: str, model_dir: Path) -> Iterator[TestClient]:
    get_settings.cache_clear()
    with TestClient(create_app()) as client:
        yield client


def _owned_by_a(client: TestClient, a: dict[str, str]) -> dict[str, str]:
    """A job, a file and a batch of tenant A's; returns their ids."""
    job = client.post("/v1/jobs", json={"model": TINY, "items": [{"prompt": SECRET}]}, headers=a)
    assert job.status_code == 202, job.text
    line = {
        "custom_id": "a1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": TINY, "messages": [{"role": "user", "content": SECRET}]},
    }
    upload = client.post(
        "/v1/files",
        files={"file": ("a-private.jsonl", json.dumps(line).encode())},
        data={"purpose": "batch"},
        headers=a,
    )
    assert upload.status_code == 200, upload.text
    body = {
        "input_file_id": upload.json()["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    batch = client.post("/v1/batches", json=body, headers=a)
    assert batch.status_code == 200 and batch.json()["status"] == "in_progress", batch.text
    return {"job": job.json()["id"], "file": upload.json()["id"], "batch": batch.json()["id"]}


def test_another_tenants_job_file_and_batch_are_not_found(app_client: TestClient) -> None:
    a, b = bearer("tenant-a"), bearer("tenant-b")
    owned = _owned_by_a(app_client, a)
    requests = [
        ("GET", "/v1/jobs/{job}"),
        ("GET", "/v1/jobs/{job}/results"),
        ("GET", "/v1/jobs/{job}/labels"),
        ("POST", "/v1/jobs/{job}/cancel"),
        ("GET", "/v1/files/{file}"),
        ("GET", "/v1/files/{file}/content"),
        ("DELETE", "/v1/files/{file}"),
        ("GET", "/v1/batches/{batch}"),
        ("POST", "/v1/batches/{batch}/cancel"),
    ]
    missing = {"job": "job_missing", "file": "file-missing", "batch": "batch_missing"}
    for method, path in requests:
        theirs = app_client.request(method, path.format(**owned), headers=b)
        nobody = app_client.request(method, path.format(**missing), headers=b)
        assert theirs.status_code == 404, (method, path, theirs.text)
        # Word for word what a missing id gets, so B learns nothing, not even that it exists.
        kind = re.search(r"\{(\w+)\}", path).group(1)  # type: ignore[union-attr]
        assert theirs.text.replace(owned[kind], missing[kind]) == nobody.text
        assert SECRET not in theirs.text and "a-private" not in theirs.text

    # B's lists hold none of A's; B's batch cannot take A's file as its input.
    for path in ("/v1/jobs", "/v1/files", "/v1/batches"):
        listed = app_client.get(path, headers=b)
        assert listed.status_code == 200 and listed.json()["data"] == [], listed.text
    body = {
        "input_file_id": owned["file"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    assert app_client.post("/v1/batches", json=body, headers=b).status_code == 404

    # Nothing B tried changed A's work.
    assert app_client.get(f"/v1/jobs/{owned['job']}", headers=a).json()["status"] == "queued"
    assert SECRET in app_client.get(f"/v1/files/{owned['file']}/content", headers=a).text
    assert app_client.get(f"/v1/batches/{owned['batch']}", headers=a).json()["status"] == (
        "in_progress"
    )
    listed = app_client.get("/v1/jobs", headers=a).json()["data"]
    assert owned["job"] in [job["id"] for job in listed] and len(listed) == 2  # and the batch's


def _v1_requests() -> list[tuple[str, str]]:
    """Every method and path under /v1 the app serves (through its included routers), path
    parameters filled in."""
    found = [
        (method, re.sub(r"\{[^}]+\}", "x", route.path))
        for route in iter_route_contexts(create_app().routes)
        if route.path and route.path.startswith("/v1")
        for method in sorted(route.methods or ())
    ]
    assert len(found) >= 18, found  # jobs, files, batches, completions and models at least
    return found


def test_every_v1_route_needs_a_key(app_client: TestClient) -> None:
    for authorization in (None, "Bearer", "Bearer gb_unknown_key", "Basic dXNlcjpwYXNz"):
        headers = {"Authorization": authorization} if authorization else {}
        for method, path in _v1_requests():
            response = app_client.request(method, path, headers=headers)
            where = (authorization, method, path, response.text)
            assert response.status_code == 401, where
            assert response.headers["www-authenticate"] == "Bearer", where
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key", where
            # The native job API keeps its own type; the OpenAI-compatible routes answer as OpenAI.
            native = path.startswith("/v1/jobs")
            expected = "authentication_error" if native else "invalid_request_error"
            assert error["type"] == expected, where
            assert error["param"] == "authorization", where
            assert "gemma-batch keys create" in error["message"], where
