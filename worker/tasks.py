"""Celery tasks. Thin: they take ids and hand the work to plain functions."""

from __future__ import annotations

import os
from typing import Any

from gemma_batch.dispatch.queues import RUN_CHUNK, celery_app
from worker import runtime

__all__ = ["celery_app", "run_chunk"]


@celery_app.task(name=RUN_CHUNK, bind=True)
def run_chunk(self: Any, job_id: str, chunk: int, items: int) -> dict[str, int]:
    """Run one chunk of a job (`items` is its size, shown in Flower; the rows come from SQL)."""
    # The lease owner is this process: a restarted worker on the same host is someone else.
    owner = f"{self.request.hostname or 'worker'}/{os.getpid()}"
    return runtime.process_chunk(job_id, chunk, owner)
