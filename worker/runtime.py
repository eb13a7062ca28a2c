"""Per-process worker state: the model is loaded once, in the process that runs the tasks.

We run Celery's prefork pool with one child per worker. The parent never imports torch, so
CUDA is first touched in the child, after the fork (CUDA cannot survive a fork). The child
loads the model in `worker_process_init`, which is why `worker_proc_alive_timeout` is raised
from its 4 s default. We keep prefork over the solo pool for its time limits and because a
child that dies (a CUDA fault, the OOM killer) is replaced while its task is handed back.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery.signals import worker_process_init

from gemma_batch.models.cache import get_prepared
from gemma_batch.settings import get_settings
from gemma_batch.store.claims import claim_chunk, claim_companions
from gemma_batch.store.sessions import reset_sql_engine
from worker import metrics
from worker.chunk import Chunk
from worker.heartbeat import Heartbeat, with_db_retries

log = logging.getLogger(__name__)

_engine: Any = None


@worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    # The parent's pooled DB connections must not be shared with the child.
    reset_sql_engine()
    metrics.serve(get_settings().worker_metrics_port)
    global _engine
    _engine = load_engine()


def load_engine() -> Any:
    """Load the configured model from the local cache (imports torch, so only in workers)."""
    from worker.engine.engine import Engine
    from worker.engine.loader import load_model, resolve_device

    settings = get_settings()
    prepared = get_prepared(settings.model_dir, settings.model)
    started = time.perf_counter()
    model, tokenizer = load_model(prepared.path, settings.quantization, settings.device)
    metrics.MODEL_LOAD.set(time.perf_counter() - started)
    log.info("model %s ready in worker process %s", settings.model, os.getpid())
    on_cuda = resolve_device(settings.device) == "cuda"
    static = settings.static_cache == "on" or (settings.static_cache == "auto" and on_cuda)
    return Engine(model, tokenizer, settings.batch_tokens, static, settings.fault_injection)


def process_chunk(job_id: str, chunk: int, worker: str) -> dict[str, int]:
    """Run a chunk's pending items, storing each micro-batch's results as it finishes.

    The items are leased in SQL first, so a chunk delivered twice is computed once; a small
    chunk is topped up with like jobs' untried items (see gemma_batch.store.claims).
    """
    global _engine
    if _engine is None:  # pools without child processes never send worker_process_init
        _engine = load_engine()
    settings = get_settings()
    spec, claimed = with_db_retries(
        lambda session: claim_chunk(session, job_id, chunk, worker, settings.lease_seconds)
    )
    if spec is None or not claimed:
        return {"stored": 0}
    room = settings.merge_items - len(claimed)
    if room > 0 and all(c.attempts == 0 for c in claimed):
        companions = with_db_retries(
            lambda session: claim_companions(
                session, settings.model, spec, job_id, room, worker, settings.lease_seconds
            )
        )
        if companions:
            log.info(
                "chunk %s of %s takes %s items of %s like jobs",
                chunk,
                job_id,
                len(companions),
                len({c.job_id for c in companions}),
            )
        claimed += companions
    with Heartbeat([c.item_id for c in claimed], worker, settings.lease_seconds):
        stored = Chunk(_engine, job_id, spec, settings.max_attempts).run(claimed)
    return {"stored": stored}
