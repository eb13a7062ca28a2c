"""/metrics: Prometheus gauges of jobs, items and queue depths, read at each scrape."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gemma_batch.metrics import StoreCollector

router = APIRouter(tags=["operations"])
registry = CollectorRegistry()
registry.register(StoreCollector())


@router.get("/metrics", response_class=Response)
def metrics() -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
