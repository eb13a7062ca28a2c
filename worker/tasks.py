"""Celery tasks. Thin: they take ids and hand the work to plain functions."""

from __future__ import annotations

from typing import Any

from gemma_batch.queue import RUN_CHUNK, celery_app
from worker import runtime

__all__ = ["celery_app", "run_chunk"]


@celery_app.task(name=RUN_CHUNK, bind=True)
def run_chunk(self: Any, job_id: str, chunk: int, items: int) -> dict[str, int]:
    """Run one chunk of a job (`items` is its size, shown in Flower; the rows come from SQL)."""
    return runtime.process_chunk(job_id, chunk, self.request.hostname or "worker")
