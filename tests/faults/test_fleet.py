"""A fleet on one machine: two API processes with data folders of their own, three workers (two
serving the real Gemma 3 270M, one the tiny model), one PostgreSQL, one Redis.

What one API stores, the other serves: a job submitted on API 1 is read on API 2, a file
uploaded on API 2 feeds a batch created on API 1. Then one API and one worker are killed with
SIGKILL mid-job, and every item still completes exactly once: the other API's dispatcher takes
the lock and goes on releasing chunks, and the other worker runs what the dead one held.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from gemma_batch.cli.stack import free_port
from tests.conftest import REAL, TINY
from tests.faults.conftest import FaultStack, prompts, wait_for

TOTAL = 96  # twelve chunks of 8: more than the window, so releases go on after the kills


def _start_api(stack: FaultStack, name: str, port: int, data: Path) -> httpx.Client:
    stack._spawn(
        name, "api", "--host", "127.0.0.1", "--port", str(port),
        env={"GEMMA_BATCH_DATA_DIR": str(data)},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, 60, stack.tails, 0.3)
    assert stack._headers is not None
    return httpx.Client(base_url=url, headers=stack._headers, timeout=60)


def _holding(stack: FaultStack, job_id: str) -> str | None:
    """A 270M worker that leases items of the job right now (leases name the pool child)."""
    pids = {
        int(row.worker.rsplit("/", 1)[1])
        for row in stack.store.items(job_id)
        if row.status == "pending" and row.worker
    }
    for name in ("real1", "real2"):
        if any(child.pid in pids for child in stack.pool_children(name)):
            return name
    return None


@pytest.mark.timeout(900)
def test_two_apis_three_workers_survive_a_killed_api_and_worker(
    make_stack: Callable[..., FaultStack], tmp_path: Path
) -> None:
    # make_stack starts API 1 (its own data folder) and no worker; the rest is started here.
    stack = make_stack(env={"GEMMA_BATCH_DATA_DIR": str(tmp_path / "api1")}, workers=0)
    api1 = stack.client().http
    api2 = _start_api(stack, "api2", free_port(), tmp_path / "api2")
    for name, model in (("real1", REAL), ("real2", REAL), ("tiny", TINY)):
        stack.start_worker(name, wait=False, env={"GEMMA_BATCH_MODEL": model})
    for name in ("real1", "real2", "tiny"):
        stack.wait_worker_ready(name, timeout=180)

    # Submitted on API 1, read on API 2.
    body = {"model": REAL, "items": prompts(TOTAL), "params": {"max_new_tokens": 4}}
    submitted = api1.post("/v1/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    assert api2.get(f"/v1/jobs/{job_id}").json()["counts"]["total"] == TOTAL

    # Uploaded on API 2, made a batch on API 1 (the tiny model's worker runs it).
    lines = [
        {
            "custom_id": f"q{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": TINY, "messages": [{"role": "user", "content": f"Q{i}"}]},
        }
        for i in range(5)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = api2.post("/v1/files", files={"file": ("q.jsonl", data)}, data={"purpose": "batch"})
    assert upload.status_code == 200, upload.text
    batch = api1.post(
        "/v1/batches",
        json={
            "input_file_id": upload.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert batch.status_code == 200, batch.text

    # Mid-job: API 1 (the one that took the job) and a worker that holds items are killed.
    stack.wait_completed_items(job_id, at_least=8, timeout=300)
    stack.kill_worker("api")
    holder = wait_for(lambda: _holding(stack, job_id), 60, lambda: stack.describe(job_id))
    stack.kill_worker(holder)
    assert stack.store.completed(job_id) < TOTAL, "the job ended before the kills"

    def finished() -> bool:
        info = api2.get(f"/v1/jobs/{job_id}").json()
        return info["status"] == "completed"

    wait_for(finished, 600, lambda: stack.describe(job_id))
    rows = stack.store.items(job_id)
    assert [row.index for row in rows] == list(range(TOTAL))
    assert all(row.status == "completed" and row.output for row in rows)
    assert all(row.attempts <= 2 for row in rows)
    results = [json.loads(line) for line in api2.get(f"/v1/jobs/{job_id}/results").iter_lines()]
    assert [line["index"] for line in results] == list(range(TOTAL)), "results lost or doubled"

    # The batch, read on API 2, completed with one answer per line.
    batch_id = batch.json()["id"]

    def batch_done() -> dict | None:  # type: ignore[type-arg]
        info = api2.get(f"/v1/batches/{batch_id}").json()
        return info if info["status"] == "completed" else None

    info = wait_for(batch_done, 300, lambda: stack.tails())
    assert info["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
    output = api2.get(f"/v1/files/{info['output_file_id']}/content").text.splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in output) == [f"q{i}" for i in range(5)]
