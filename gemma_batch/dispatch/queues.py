"""The Celery app, built from settings; the API sends with it and the workers consume with it.

Nothing here imports torch: importing this module is cheap for the API.
"""

from __future__ import annotations

import logging

from celery import Celery

from gemma_batch.domain.records import BATCH_PRIORITY, INTERACTIVE_PRIORITY
from gemma_batch.settings import get_settings

log = logging.getLogger(__name__)

RUN_CHUNK = "gemma_batch.run_chunk"


def queue_name(model: str) -> str:
    """Each model has its own queue, so a worker only receives work for the model it loaded."""
    return f"gemma-batch.{model}"


def create_celery() -> Celery:
    settings = get_settings()
    if settings.task_time_limit >= settings.visibility_timeout:
        log.warning(
            "task_time_limit (%ss) is not below visibility_timeout (%ss): a long chunk may be "
            "handed to a second worker while it runs (its lease keeps it from running twice)",
            settings.task_time_limit,
            settings.visibility_timeout,
        )
    # The worker registers its tasks (worker.tasks); the API sends them by name.
    app = Celery("gemma_batch", broker=settings.broker_url)
    app.conf.update(
        # Only JSON travels: tasks carry ids, never pickled objects.
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # A chunk is acknowledged only once its results are in SQL; a worker that dies
        # hands it back instead of losing it.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Loading a model takes far longer than Celery's default 4 s allowance.
        worker_proc_alive_timeout=settings.worker_init_timeout,
        worker_hijack_root_logger=False,
        # Events let Flower show each chunk task: its job id, chunk number and size, never text.
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        # A submit must not hang on a dead broker: fail fast and let the API say so.
        broker_connection_timeout=3,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        # Set together (README, "Guarantees"): a chunk is killed at its time limit before Redis
        # would hand it to another worker; should it be handed out anyway, the SQL lease keeps
        # the second delivery from computing what the first is computing.
        task_time_limit=settings.task_time_limit,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # Redis has no message priorities; kombu emulates them with one list per step.
            "queue_order_strategy": "priority",
            "priority_steps": [INTERACTIVE_PRIORITY, 3, BATCH_PRIORITY, 9],
        },
    )
    return app


celery_app = create_celery()


def enqueue_chunks(
    job_id: str, model: str, chunks: list[tuple[int, int]], priority: int = BATCH_PRIORITY
) -> None:
    """One task per (chunk, size): it names the job and chunk; the worker reads the rest."""
    with celery_app.producer_or_acquire() as producer:
        for chunk, size in chunks:
            celery_app.send_task(
                RUN_CHUNK,
                args=(job_id, chunk, size),
                queue=queue_name(model),
                producer=producer,
                priority=priority,
                retry=True,
            )
