"""API keys (stored hashed, revocable), the auth switch, and the per-tenant limits."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api import auth
from api.main import create_app
from gemma_batch.settings import get_settings
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import ApiKey, Job
from tests.conftest import TINY, bearer


def _job(prompts: list[str]) -> dict[str, object]:
    return {"model": TINY, "items": [{"prompt": p} for p in prompts]}


def test_only_a_hash_of_the_key_is_stored(database_url: str) -> None:
    with session_scope() as session:
        made = auth.create_key(session, "acme")
        stored = session.get(ApiKey, made.id)
        assert stored is not None
        assert made.key.startswith(f"gb_{made.id}_")
        secret = made.key.removeprefix(f"gb_{made.id}_")
        row = session.execute(select(ApiKey.__table__)).one()
        assert not any(secret in str(value) for value in row)
        assert stored.key_hash == hashlib.sha256(made.key.encode()).hexdigest()
        assert auth.tenant_of(session, made.key) == "acme"
        # Right id, wrong secret; no prefix; id alone.
        assert auth.tenant_of(session, made.key[:-1] + "x") is None
        assert auth.tenant_of(session, made.key.removeprefix("gb_")) is None
        assert auth.tenant_of(session, f"gb_{made.id}_") is None


def test_a_revoked_key_is_refused_and_other_keys_still_work(client: TestClient) -> None:
    first, second = bearer("acme"), bearer("acme")
    assert client.get("/v1/jobs", headers=first).status_code == 200
    key_id = first["Authorization"].removeprefix("Bearer gb_").split("_")[0]
    with session_scope() as session:
        auth.revoke_key(session, key_id)
    refused = client.get("/v1/jobs", headers=first)
    assert refused.status_code == 401
    assert refused.json()["error"]["param"] == "authorization"
    assert client.get("/v1/jobs", headers=second).status_code == 200


def test_with_auth_off_every_request_is_the_default_tenant_and_it_says_so_loudly(
    database_url: str,
    model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("GEMMA_BATCH_AUTH", "false")
    get_settings.cache_clear()
    with caplog.at_level(logging.WARNING), TestClient(create_app()) as client:
        created = client.post("/v1/jobs", json=_job(["hi"]))
        assert created.status_code == 202, created.text
        assert [j["id"] for j in client.get("/v1/jobs").json()["data"]] == [created.json()["id"]]
    assert "AUTH IS OFF" in caplog.text
    with session_scope() as session:
        assert session.scalars(select(Job.tenant)).all() == ["default"]
    get_settings.cache_clear()


def test_queued_items_over_the_tenants_limit_are_429(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMMA_BATCH_MAX_QUEUED_ITEMS", "5")
    get_settings.cache_clear()
    first = client.post("/v1/jobs", json=_job(["a", "b", "c"]))
    assert first.status_code == 202, first.text
    refused = client.post("/v1/jobs", json=_job(["d", "e", "f"]))
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert (error["queued"], error["limit"], error["param"]) == (3, 5, "items")
    assert "over the limit of 5" in error["message"]
    # The limit is each tenant's own, and items that are over no longer count.
    assert client.post("/v1/jobs", json=_job(["x"] * 5), headers=bearer("other")).status_code == 202
    assert client.post(f"/v1/jobs/{first.json()['id']}/cancel").status_code == 200
    assert client.post("/v1/jobs", json=_job(["d", "e", "f"])).status_code == 202


def test_a_prompt_over_the_length_limit_is_refused_naming_the_item(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMMA_BATCH_MAX_PROMPT_CHARS", "100")
    get_settings.cache_clear()
    long = "y" * 101
    # The native API answers 422; the OpenAI-compatible routes 400, as OpenAI does.
    cases = [
        ("/v1/jobs", _job(["fine", long]), "items[1].prompt", 422),
        (
            "/v1/jobs",
            {"model": TINY, "items": [{"messages": [{"role": "user", "content": long}]}]},
            "items[0].messages",
            422,
        ),
        (
            "/v1/chat/completions",
            {"model": TINY, "messages": [{"role": "user", "content": long}]},
            "messages",
            400,
        ),
        ("/v1/completions", {"model": TINY, "prompt": long}, "prompt", 400),
    ]
    for path, body, param, status in cases:
        response = client.post(path, json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["param"] == param
        assert error["message"] == f"{param}: the prompt is 101 characters, over the limit of 100"
    upload = client.post(
        "/v1/jobs",
        data={"model": TINY, "template": "Say {text}"},
        files={"file": ("rows.jsonl", b'{"text": "ok"}\n{"text": "' + long.encode() + b'"}\n')},
    )
    assert upload.status_code == 422
    assert upload.json()["error"]["param"] == "line 2"
    with session_scope() as session:
        assert session.scalars(select(Job.id)).all() == []
