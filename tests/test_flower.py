"""Flower, started by `gemma-batch flower`, sees the workers and the job's chunk tasks."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from gemma_batch.cli.stack import LocalStack, free_port
from tests.conftest import TINY

AUTH = ("watcher", "s3cret-pass")


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    return {"GEMMA_BATCH_CHUNK_SIZE": "4"}


@pytest.fixture(scope="module")
def flower(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    env = stack.env | {"GEMMA_BATCH_FLOWER_AUTH": ":".join(AUTH)}
    log = (tmp_path_factory.mktemp("flower-log") / "flower.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gemma_batch", "flower", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthcheck", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
    yield url
    process.terminate()
    process.wait(timeout=30)


def test_flower_needs_basic_auth(flower: str) -> None:
    assert httpx.get(f"{flower}/api/workers", timeout=10).status_code == 401
    assert (
        httpx.get(f"{flower}/api/workers", auth=("watcher", "wrong"), timeout=10).status_code == 401
    )


def test_flower_shows_the_worker_and_the_jobs_tasks(stack: LocalStack, flower: str) -> None:
    prompt = "A secret prompt that must never show in Flower"
    items = [{"id": str(i), "prompt": f"{prompt} {i}"} for i in range(10)]
    job = stack.client().submit(TINY, items, {"max_new_tokens": 2})
    assert job.wait(poll=0.3).status == "completed"

    deadline = time.monotonic() + 60
    while True:
        tasks = httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=10).json()
        mine = [t for t in tasks.values() if job.id in (t.get("args") or "")]
        if (
            len(mine) == 3
            and all(t["state"] == "SUCCESS" for t in mine)
            or time.monotonic() > deadline
        ):
            break
        time.sleep(0.5)
    assert len(mine) == 3 and all(t["state"] == "SUCCESS" for t in mine), mine
    assert {t["name"] for t in mine} == {"gemma_batch.run_chunk"}
    assert sorted(t["args"] for t in mine) == [
        f"('{job.id}', {c}, {n})" for c, n in ((0, 4), (1, 4), (2, 2))
    ]
    assert not any(prompt in str(t) for t in mine)
    workers = httpx.get(
        f"{flower}/api/workers", params={"refresh": "1"}, auth=AUTH, timeout=30
    ).json()
    assert any(name.startswith("cpu@") for name in workers), workers
