"""/metrics on the API and on a worker parse as Prometheus text and agree with the rows."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from gemma_batch.cli.stack import LocalStack, free_port
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item, Job
from tests.conftest import TINY


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    return {"GEMMA_BATCH_CHUNK_SIZE": "4", "GEMMA_BATCH_WORKER_METRICS_PORT": str(free_port())}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_match_the_rows(stack: LocalStack) -> None:
    client = stack.client()
    job = client.submit(TINY, [{"prompt": f"Count {i}"} for i in range(10)], {"max_new_tokens": 3})
    job.wait(poll=0.3)

    api = _samples(httpx.get(f"{stack.url}/metrics").text)
    with session_scope() as session:
        done = session.scalar(select(func.count()).where(Item.status == "completed"))
        jobs_completed = session.scalar(select(func.count()).where(Job.status == "completed"))
        tokens = session.scalar(
            select(func.sum(Item.completion_tokens)).where(Item.job_id == job.id)
        )
    assert api[("gemma_batch_items", (("state", "done"),))] == done == 10
    assert api[("gemma_batch_jobs", (("status", "completed"),))] == jobs_completed == 1

    port = stack.env["GEMMA_BATCH_WORKER_METRICS_PORT"]
    worker = _samples(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
    assert worker[("gemma_batch_worker_items_total", (("status", "completed"),))] == done
    assert worker[("gemma_batch_worker_tokens_total", ())] >= tokens > 0
    assert worker[("gemma_batch_worker_model_load_seconds", ())] > 0
    assert worker[("gemma_batch_worker_batch_size_count", ())] >= 3


def test_queue_depth_counts_waiting_chunks(stack: LocalStack, tmp_path: Path) -> None:
    # A job for a model no worker serves stays queued: its chunks wait in the broker.
    idle = f"idle-{TINY}"  # named after the run, so the run's clean-up takes its queue too
    other = Path(stack.env["GEMMA_BATCH_MODEL_DIR"]) / idle
    if not other.exists():
        other.symlink_to(Path(stack.env["GEMMA_BATCH_MODEL_DIR"]) / TINY)
    job = stack.client().submit(idle, [{"prompt": "x"}] * 9, {"max_new_tokens": 1})
    api = _samples(httpx.get(f"{stack.url}/metrics").text)
    assert api[("gemma_batch_queue_depth", (("model", idle),))] == 3
    assert api[("gemma_batch_items", (("state", "queued"),))] == 9
    assert api[("gemma_batch_jobs", (("status", "queued"),))] == 1
    job.cancel()
    api = _samples(httpx.get(f"{stack.url}/metrics").text)
    assert api[("gemma_batch_items", (("state", "cancelled"),))] == 9
    assert api[("gemma_batch_jobs", (("status", "cancelled"),))] == 1
