"""The whole path on real parts: HTTP API -> Redis -> Celery worker process -> Gemma -> SQL.

Runs once on SQLite and once on PostgreSQL, with the tiny random Gemma quantized to nf4.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from api.jobs.schemas import JobRead, ResultLine
from gemma_batch.cli.stack import LocalStack
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item
from tests.conftest import TINY, run_cli


@pytest.fixture(scope="module")
def stack_database(module_database_url: str) -> str:
    return module_database_url


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    return {"GEMMA_BATCH_CHUNK_SIZE": "8", "GEMMA_BATCH_QUANTIZATION": "nf4"}


def _prompts(count: int) -> list[dict[str, str]]:
    return [{"id": f"p{i}", "prompt": f"Item {i}: tell me about number {i}"} for i in range(count)]


def test_fifty_items_complete_with_outputs_and_counts(stack: LocalStack) -> None:
    job = stack.client().submit(TINY, _prompts(50), {"max_new_tokens": 6})
    assert job.info.status == "queued"
    assert job.info.counts.total == 50
    info = job.wait(poll=0.3)
    assert info.status == "completed"
    assert (info.counts.completed, info.counts.failed) == (50, 0)
    assert info.started_at is not None and info.finished_at is not None

    lines = [ResultLine.model_validate(line) for line in job.results()]
    assert [line.index for line in lines] == list(range(50))
    assert [line.id for line in lines] == [f"p{i}" for i in range(50)]
    for line in lines:
        assert line.status == "completed"
        assert line.output is not None
        assert line.prompt_tokens and line.prompt_tokens > 5
        assert line.completion_tokens and 1 <= line.completion_tokens <= 6
        assert line.finish_reason in ("stop", "length")

    with session_scope() as session:
        rows = session.scalars(select(Item).where(Item.job_id == job.id)).all()
    assert len(rows) == 50
    assert {row.status for row in rows} == {"completed"}
    assert all(row.attempts == 1 and row.worker and row.worker.startswith("cpu@") for row in rows)


def test_a_seeded_sample_is_the_same_in_a_batch_or_alone(stack: LocalStack) -> None:
    params = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 0.95, "seed": 1234}
    client = stack.client()
    batched = client.submit(TINY, _prompts(12), params)
    assert batched.wait(poll=0.3).status == "completed"
    together = {line["index"]: line["output"] for line in batched.results()}
    for index in (0, 5, 11):
        alone = client.submit(TINY, [_prompts(12)[index]], params)
        assert alone.wait(poll=0.3).status == "completed"
        (line,) = list(alone.results())
        assert line["output"] == together[index]
    other = client.submit(TINY, _prompts(12), params | {"seed": 4321})
    other.wait(poll=0.3)
    assert [line["output"] for line in other.results()] != [together[i] for i in range(12)]


def test_model_is_loaded_once_for_many_tasks(stack: LocalStack) -> None:
    stack.client().submit(TINY, _prompts(20), {"max_new_tokens": 2}).wait(poll=0.3)
    log = stack.log("worker")
    assert log.count("Task gemma_batch.run_chunk") >= 2 * 7  # 50 and 20 items in chunks of 8
    assert log.count(f"model {TINY} ready in worker process") == 1


def test_results_as_csv(stack: LocalStack) -> None:
    job = stack.client().submit(TINY, _prompts(3), {"max_new_tokens": 2})
    job.wait(poll=0.3)
    text = stack.client().http.get(f"/v1/jobs/{job.id}/results", params={"format": "csv"}).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [row["id"] for row in rows] == ["p0", "p1", "p2"]
    assert all(row["status"] == "completed" and row["completion_tokens"] for row in rows)


def test_jobs_are_listed_newest_first_in_pages(stack: LocalStack) -> None:
    client = stack.client()
    ids = [client.submit(TINY, _prompts(1), {"max_new_tokens": 1}).id for _ in range(3)]
    first = client.request("GET", "/v1/jobs", params={"limit": 2})
    assert [job["id"] for job in first["data"]] == ids[::-1][:2]
    assert first["has_more"] is True
    second = client.request("GET", "/v1/jobs", params={"limit": 2, "after": first["last_id"]})
    assert second["data"][0]["id"] == ids[0]


def test_cancel_stops_a_job_and_keeps_what_was_done(stack: LocalStack) -> None:
    client = stack.client()
    job = client.submit(TINY, _prompts(400), {"max_new_tokens": 48})
    while job.refresh().counts.completed == 0:
        time.sleep(0.1)
    cancelled = job.cancel()
    assert cancelled.status == "cancelled"
    time.sleep(2)
    after = job.refresh()
    assert after.status == "cancelled"
    assert 0 < after.counts.completed < 400
    with session_scope() as session:
        statuses = session.scalars(select(Item.status).where(Item.job_id == job.id)).all()
    assert statuses.count("completed") == after.counts.completed
    assert statuses.count("cancelled") == 400 - after.counts.completed
    assert len(list(job.results())) == after.counts.completed
    again = stack.client().http.post(f"/v1/jobs/{job.id}/cancel")
    assert again.status_code == 409


def _cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=stack.env, timeout=300)


def test_cli_submit_wait_status_results(stack: LocalStack, tmp_path: Path) -> None:
    source = tmp_path / "items.jsonl"
    source.write_text("\n".join(json.dumps(item) for item in _prompts(5)) + "\n")
    submitted = _cli(
        stack, "submit", str(source), "--model", TINY, "--max-new-tokens", "3", "--wait"
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert "completed: 5 completed, 0 failed" in submitted.stderr

    status = JobRead.model_validate_json(_cli(stack, "status", job_id).stdout)
    assert status.status == "completed" and status.counts.completed == 5

    out = tmp_path / "out.csv"
    assert _cli(stack, "results", job_id, "-o", str(out)).returncode == 0
    assert [row["id"] for row in csv.DictReader(out.open())] == [f"p{i}" for i in range(5)]
    lines = _cli(stack, "results", job_id).stdout.splitlines()
    assert [ResultLine.model_validate_json(line).index for line in lines] == list(range(5))


def test_cli_errors_are_one_readable_line(stack: LocalStack, tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"prompt": "fine"}\n\n{"id": "x"}\n')
    bad_line = _cli(stack, "submit", str(source))
    assert bad_line.returncode == 1
    assert "line 3: give exactly one of 'prompt' or 'messages'" in bad_line.stderr
    assert "Traceback" not in bad_line.stderr

    source.write_text('{"prompt": "fine"}\n')
    unknown = _cli(stack, "submit", str(source), "--model", "gemma-99b")
    assert unknown.returncode == 1
    assert "unknown model 'gemma-99b'" in unknown.stderr
    assert "Traceback" not in unknown.stderr

    missing = _cli(stack, "status", "job_missing")
    assert missing.returncode == 1 and "no job 'job_missing'" in missing.stderr
