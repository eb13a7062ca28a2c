"""Prometheus metrics of one worker process, served on its own port."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from gemma_batch.domain.records import ItemResult

log = logging.getLogger(__name__)

ITEMS = Counter("gemma_batch_worker_items", "Items answered (completed or failed)", ["status"])
TOKENS = Counter("gemma_batch_worker_tokens", "Tokens generated")
ITEMS_PER_S = Gauge("gemma_batch_worker_items_per_second", "Items/s of the last micro-batch")
TOKENS_PER_S = Gauge("gemma_batch_worker_tokens_per_second", "Tokens/s of the last micro-batch")
BATCH_SIZE = Histogram(
    "gemma_batch_worker_batch_size",
    "Rows per forward pass (a prefill of joining rows, or a decode step of the running ones)",
    buckets=(1, 4, 16, 64, 256, 1024),
)
MODEL_LOAD = Gauge("gemma_batch_worker_model_load_seconds", "Seconds the model took to load")
GPU_MEMORY = Gauge("gemma_batch_worker_gpu_memory_bytes", "GPU memory allocated by torch")


def serve(host: str, port: int) -> None:
    """Serve /metrics on `port` (0: not at all); a busy port costs the metrics, not the worker."""
    if not port:
        return
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.warning("worker metrics not served on port %s: %s", port, exc)
        return
    log.info("worker metrics on port %s", port)


def forward(rows: int, passes: int = 1) -> None:
    """Count `passes` forward passes of `rows` rows each."""
    for _ in range(passes):
        BATCH_SIZE.observe(rows)


def observe(results: list[ItemResult], seconds: float) -> None:
    """Count the results of one step (or label micro-batch) that took `seconds`."""
    tokens = sum(r.completion_tokens or 0 for r in results)
    for result in results:
        ITEMS.labels("failed" if result.error else "completed").inc()
    TOKENS.inc(tokens)
    if seconds > 0:
        ITEMS_PER_S.set(len(results) / seconds)
        TOKENS_PER_S.set(tokens / seconds)
    _gpu_memory()


def _gpu_memory() -> None:
    # Imported here: the Celery parent process imports this module and must never load torch.
    from worker.engine.loader import gpu_memory_bytes

    allocated = gpu_memory_bytes()
    if allocated is not None:
        GPU_MEMORY.set(allocated)
