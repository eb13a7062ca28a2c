"""A submit while Redis is unreachable: 503, and nothing stored (the job is not half-made)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import func, select

from api import auth
from gemma_batch.cli.stack import free_port
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item, Job
from tests.conftest import TINY


def test_submit_with_the_broker_down_is_refused_and_stores_nothing(
    sqlite_url: str, model_dir: Path, tmp_path: Path
) -> None:
    with session_scope() as session:
        key = auth.create_key(session, "tests").key
    port = free_port()
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    log = (tmp_path / "api.log").open("wb")
    api = subprocess.Popen(
        [sys.executable, "-m", "gemma_batch", "api", "--port", str(port)],
        env=os.environ | {"GEMMA_BATCH_DATABASE_URL": sqlite_url, "GEMMA_BATCH_BROKER_URL": dead},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        response = httpx.post(
            f"{url}/v1/jobs",
            json={"model": TINY, "items": [{"prompt": "a"}, {"prompt": "b"}]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
    finally:
        api.terminate()
        api.wait(timeout=30)
    assert response.status_code == 503, response.text
    # Only that much: the broker's exception text (hosts, users) stays in the API's log.
    assert response.json()["error"]["message"] == "the job queue is unreachable; nothing was stored"
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
        assert session.scalar(select(func.count()).select_from(Item)) == 0
