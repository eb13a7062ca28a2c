"""Many one-item jobs share one model batch, each result lands in its own job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select

from gemma_batch.cli.stack import LocalStack
from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import WorkItem
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item
from tests.conftest import TINY
from worker.engine.engine import Engine
from worker.engine.loader import load_model

PROMPTS = [f"Small job number {i} says" for i in range(12)]


def test_small_jobs_are_merged_and_answered_alone(
    sqlite_url: str, model_dir: Path, tmp_path: Path
) -> None:
    # Another name for the tiny model, served by no worker until the jobs are all queued.
    late = f"late-{TINY}"
    (model_dir / late).symlink_to(model_dir / TINY)
    with LocalStack({}, tmp_path) as stack:  # its worker serves the tiny model's queue, not late's
        client = stack.client()
        jobs = [client.submit(late, [{"prompt": p}], {"max_new_tokens": 5}) for p in PROMPTS]
        log = (tmp_path / "late-worker.log").open("wb")
        command = ["worker", "--device", "cpu", "--model", late]
        worker = subprocess.Popen(
            [sys.executable, "-m", "gemma_batch", *command],
            env=os.environ | {"GEMMA_BATCH_QUANTIZATION": "none"},
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            for job in jobs:
                assert job.wait(poll=0.3).status == "completed"
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    text = (tmp_path / "late-worker.log").read_text()
    assert "claimed" in text and "items of" in text

    # Each answer is what the job would have got alone.
    model, tokenizer = load_model(model_dir / TINY, "none", "cpu")
    engine = Engine(model, tokenizer, batch_tokens=4096)
    spec = JobSpec(params=GenerationParams(max_new_tokens=5))
    started = []
    with session_scope() as session:
        for job, prompt in zip(jobs, PROMPTS, strict=True):
            (item,) = session.scalars(select(Item).where(Item.job_id == job.id)).all()
            (alone,) = [r for b in engine.run([WorkItem(0, prompt, None)], spec) for r in b]
            assert (item.output, item.completion_tokens) == (alone.output, alone.completion_tokens)
            assert item.attempts == 1
            started.append(item.started_at)
    # Rows admitted together are counted started by one statement, at one moment: the worker,
    # started once all twelve jobs were queued, took them into one batch (a delivery that beat
    # its first pull may make a group of its own).
    assert max(started.count(moment) for moment in started) >= len(PROMPTS) - 1
