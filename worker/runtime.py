"""Per-process worker state: the model is loaded once, in the process that runs the tasks.

We run Celery's prefork pool with one child per worker. The parent never imports torch, so
CUDA is first touched in the child, after the fork (CUDA cannot survive a fork). The child
loads the model in `worker_process_init`, which is why `worker_proc_alive_timeout` is raised
from its 4 s default. We keep prefork over the solo pool for its time limits and because a
child that dies (a CUDA fault, the OOM killer) is replaced while its task is handed back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from celery.signals import worker_process_init

from gemma_batch.db import reset_engine, session_scope
from gemma_batch.merging import claim_companions
from gemma_batch.model_cache import get_prepared
from gemma_batch.params import GenerationParams, JobSpec
from gemma_batch.progress import ItemResult, WorkItem, claim_chunk, record_results
from gemma_batch.settings import get_settings
from worker import metrics

log = logging.getLogger(__name__)

_engine: Any = None


@worker_process_init.connect
def _load_engine(**_: Any) -> None:
    # The parent's pooled DB connections must not be shared with the child.
    reset_engine()
    metrics.serve(get_settings().worker_metrics_port)
    global _engine
    _engine = build_engine()


def build_engine() -> Any:
    """Load the configured model from the local cache (imports torch, so only in workers)."""
    from worker.engine import Engine
    from worker.loader import load_model, resolve_device

    settings = get_settings()
    prepared = get_prepared(settings.model_dir, settings.model)
    started = time.perf_counter()
    model, tokenizer = load_model(prepared.path, settings.quantization, settings.device)
    metrics.MODEL_LOAD.set(time.perf_counter() - started)
    log.info("model %s ready in worker process %s", settings.model, os.getpid())
    on_cuda = resolve_device(settings.device) == "cuda"
    static = settings.static_cache == "on" or (settings.static_cache == "auto" and on_cuda)
    return Engine(model, tokenizer, settings.batch_tokens, static)


def _run_groups(items: list[WorkItem], spec: JobSpec) -> Iterator[list[ItemResult]]:
    """Items with their own settings (OpenAI batch lines) run in groups of equal settings.

    Only max_new_tokens may differ inside a group: the engine ends each row at its own.
    """
    groups: dict[str, list[WorkItem]] = {}
    for item in items:
        key = {k: v for k, v in (item.params or {}).items() if k != "max_new_tokens"}
        groups.setdefault(json.dumps(key if item.params else None, sort_keys=True), []).append(item)
    for group in groups.values():
        own = group[0].params
        if own is None:
            yield from _engine.run(group, spec)
            continue
        params = {k: v for k, v in own.items() if k != "json_schema"}
        params["max_new_tokens"] = max(item.params["max_new_tokens"] for item in group)  # type: ignore[index]
        update = {
            "params": GenerationParams.model_validate(params),
            "json_schema": own.get("json_schema"),
        }
        answered: set[int] = set()
        try:
            for results in _engine.run(group, spec.model_copy(update=update)):
                answered.update(r.index for r in results)
                yield results
        except Exception as exc:
            # One group's failure (a schema the grammar compiler refuses) is not the others'.
            log.exception("a group of %s items failed", len(group))
            yield [
                ItemResult(item.index, error=f"{exc.__class__.__name__}: {exc}")
                for item in group
                if item.index not in answered
            ]


def process_chunk(job_id: str, chunk: int, worker: str) -> dict[str, int]:
    """Generate a chunk's pending items, storing each micro-batch's results as it finishes.

    A small chunk is topped up with like jobs' untried items (see gemma_batch.merging).
    """
    global _engine
    if _engine is None:  # pools without child processes never send worker_process_init
        _engine = build_engine()
    settings = get_settings()
    with session_scope() as session:
        spec, items = claim_chunk(session, job_id, chunk, worker)
        if spec is None or not items:
            return {"stored": 0}
        work = [(job_id, item) for item in items]
        room = settings.merge_items - len(items)
        if room > 0:
            work += claim_companions(session, settings.model, spec, job_id, room, worker)
    if len(work) > len(items):
        others = {owner for owner, _ in work[len(items) :]}
        log.info(
            "chunk %s of %s takes %s items of %s like jobs",
            chunk,
            job_id,
            len(work) - len(items),
            len(others),
        )
    # The engine sees one list; each result is mapped back to its job and index.
    origin = [(owner, item.index) for owner, item in work]
    batch = [
        WorkItem(k, item.prompt, item.messages, item.params) for k, (_, item) in enumerate(work)
    ]
    done: set[int] = set()
    try:
        started = time.perf_counter()
        for results in _run_groups(batch, spec):
            metrics.observe(results, time.perf_counter() - started)
            going_on = _store(origin, results, job_id)
            done.update(result.index for result in results)
            started = time.perf_counter()
            if not going_on:
                log.info("job %s is over; chunk %s stops after %s items", job_id, chunk, len(done))
                break
    except Exception as exc:
        # A failed generation must not leave items pending forever: answer them with the error.
        log.exception("job %s chunk %s failed", job_id, chunk)
        error = f"{exc.__class__.__name__}: {exc}"
        _store(
            origin, [ItemResult(k, error=error) for k in range(len(batch)) if k not in done], job_id
        )
    return {"stored": len(done)}


def _store(origin: list[tuple[str, int]], results: list[ItemResult], own_job: str) -> bool:
    """Write results into their own jobs; True while the chunk's own job goes on."""
    by_job: dict[str, list[ItemResult]] = {}
    for result in results:
        owner, index = origin[result.index]
        by_job.setdefault(owner, []).append(replace(result, index=index))
    going_on = True
    with session_scope() as session:
        for owner, answered in by_job.items():
            still = record_results(session, owner, answered)
            going_on = still if owner == own_job else going_on
    return going_on
