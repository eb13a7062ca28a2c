"""The fleet in view: GET /v1/workers and `gemma-batch workers` show each live worker, what it
serves, how fast, and which of the caller's own jobs it runs (never another tenant's)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from api import auth
from gemma_batch.cli.stack import LocalStack
from gemma_batch.store.sessions import session_scope
from tests.conftest import TINY, run_cli, wait_for


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    # Beats every second (a third of the lease); slow prompts keep a job running a while.
    return {"GEMMA_BATCH_LEASE_SECONDS": "3", "GEMMA_BATCH_FAULT_INJECTION": "true"}


def _workers(stack: LocalStack, key: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{stack.url}/v1/workers", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def _until(stack: LocalStack, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """The workers the caller sees that `keep` keeps, once there is one."""
    seen = lambda: [w for w in _workers(stack, stack.api_key) if keep(w)]  # noqa: E731
    return wait_for(seen, 60, lambda: f"workers: {_workers(stack, stack.api_key)}")  # type: ignore[no-any-return]


def test_workers_show_what_they_run_to_its_owner_only(stack: LocalStack) -> None:
    with session_scope() as session:
        other = auth.create_key(session, "someone-else").key
    (worker,) = _until(stack, lambda w: True)
    assert (worker["host"], worker["model"], worker["device"]) == (
        socket.gethostname(),
        TINY,
        "cpu",
    )
    assert worker["quantization"] == "none" and worker["seconds_since_seen"] < 3
    assert worker["jobs"] == []

    items = [{"prompt": f"@@sleep=0.3@@ item {i}"} for i in range(24)]
    job = stack.client().submit(TINY, items, {"max_new_tokens": 2})
    running = _until(stack, lambda w: bool(w["jobs"]))
    assert running[0]["jobs"] == [job.id]
    _until(stack, lambda w: w["rows_per_second"] > 0)
    # Another tenant sees the worker, busy, but not whose job it runs.
    (seen_by_other,) = _workers(stack, other)
    assert seen_by_other["id"] == worker["id"] and seen_by_other["jobs"] == []
    listed = run_cli("workers", env=stack.env)
    assert listed.returncode == 0, listed.stderr
    assert TINY in listed.stdout and worker["id"] in listed.stdout

    assert job.wait(poll=0.3).status == "completed"
    done = _until(stack, lambda w: w["items_done"] >= 24)
    assert done[0]["jobs"] == []


def test_a_stopped_worker_leaves_the_view(stack: LocalStack) -> None:
    assert _workers(stack, stack.api_key)
    stack.stop("worker")
    assert _workers(stack, stack.api_key) == []
