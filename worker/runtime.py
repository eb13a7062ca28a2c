"""Per-process worker state: the model is loaded once, in the process that runs the tasks.

We run Celery's prefork pool with one child per worker. The parent never imports torch, so
CUDA is first touched in the child, after the fork (CUDA cannot survive a fork). The child
loads the model and starts its scheduler (worker.scheduler) in `worker_process_init`, which is
why `worker_proc_alive_timeout` is raised from its 4 s default. We keep prefork over the solo
and threads pools for its time limits and because a child that dies (a CUDA fault, the OOM
killer) is replaced while its task is handed back.

A task hands the scheduler the chunk it was delivered and waits until the chunk's items are
stored, so a delivery is acknowledged only then. The scheduler fills the rest of its batch
from the store itself (see worker.scheduler), which is how one process's batch spans chunks
and jobs while its pool runs one task at a time.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown

from gemma_batch.models.cache import get_prepared
from gemma_batch.settings import get_settings
from gemma_batch.store.claims import claim_chunk
from gemma_batch.store.fleet import Report
from gemma_batch.store.sessions import reset_sql_engine
from worker import metrics
from worker.heartbeat import with_db_retries
from worker.scheduler import Scheduler, Ticket

log = logging.getLogger(__name__)

_scheduler: Scheduler | None = None


@worker_process_init.connect
def _on_process_init(sender: str | None = None, **_: Any) -> None:
    # The parent's pooled DB connections must not be shared with the child.
    reset_sql_engine()
    settings = get_settings()
    metrics.serve(settings.worker_metrics_host, settings.worker_metrics_port)
    global _scheduler
    _scheduler = start_scheduler(f"{sender or 'worker'}/{os.getpid()}")


@worker_process_shutdown.connect
def _on_process_shutdown(**_: Any) -> None:
    # A warm shutdown ends here: the rows this process holds are finished and stored first.
    if _scheduler is not None:
        _scheduler.stop()


def load_engine() -> Any:
    """Load the configured model from the local cache (imports torch, so only in workers).

    The load runs on a thread of its own that ends with it, and the OpenMP threads its parallel
    work started end too: the scheduler's thread is then the process's only thread with a team
    of them. With a second team (the load's, kept by a thread that lives on), libgomp counts
    more threads than cores and stops letting idle ones spin between parallel ops, so each op
    waits for threads to wake: a CPU worker ran the same batch 15-20% slower than the engine alone.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="model-load") as loading:
        return loading.submit(_load_engine).result()


def _load_engine() -> Any:
    from worker.engine.engine import Engine
    from worker.engine.loader import load_model

    settings = get_settings()
    prepared = get_prepared(settings.model_dir, settings.model)
    started = time.perf_counter()
    model, tokenizer = load_model(prepared.path, settings.quantization, settings.device)
    metrics.MODEL_LOAD.set(time.perf_counter() - started)
    log.info("model %s ready in worker process %s", settings.model, os.getpid())
    return Engine(
        model,
        tokenizer,
        settings.batch_tokens,
        settings.fault_injection,
        adapter_dir=settings.model_dir,
        max_adapters=settings.max_adapters,
    )


def start_scheduler(worker: str) -> Scheduler:
    """The process's scheduler over a freshly loaded engine; `worker` names its leases."""
    from worker.engine.loader import resolve_device, resolve_quantization

    settings = get_settings()
    engine = load_engine()
    device = str(engine.model.device)
    if device.startswith("cuda") and os.environ.get("CUDA_VISIBLE_DEVICES"):
        device = f"cuda (GPU {os.environ['CUDA_VISIBLE_DEVICES']})"
    path = get_prepared(settings.model_dir, settings.model).path
    identity = Report(
        id=worker,
        host=socket.gethostname(),
        model=settings.model,
        device=device,
        quantization=resolve_quantization(
            settings.quantization, resolve_device(settings.device), path
        ),
    )
    return Scheduler(engine, settings, worker, identity).start()


def process_chunk(job_id: str, chunk: int, worker: str) -> dict[str, int]:
    """Run a delivered chunk: lease its pending items, hand them to the scheduler, and wait
    until every item of the chunk this process holds is stored.

    Items already done (a redelivered chunk) or leased by another live worker (a chunk handed
    out twice) are skipped, so nothing is computed twice.
    """
    global _scheduler
    if _scheduler is None:  # pools without child processes never send worker_process_init
        _scheduler = start_scheduler(worker)
    scheduler, settings = _scheduler, get_settings()
    spec, claimed = with_db_retries(
        lambda session: claim_chunk(
            session, job_id, chunk, scheduler.worker, settings.lease_seconds
        )
    )
    ticket = Ticket(job_id, chunk)
    scheduler.submit(ticket, spec, claimed)
    scheduler.wait(ticket)
    return {"stored": ticket.stored}
