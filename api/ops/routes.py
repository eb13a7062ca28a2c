"""Operations: /healthz (store and broker reachable), /metrics (Prometheus), /v1/workers (the
fleet), /ui (dashboard)."""

from __future__ import annotations

import hmac
import logging
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Header, Response
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from sqlalchemy import text

from api.deps import SessionDep, SettingsDep, TenantDep
from api.ops.metrics import StoreCollector
from gemma_batch.store.fleet import live_workers, own_jobs
from gemma_batch.store.tables import as_utc

log = logging.getLogger(__name__)
router = APIRouter()
registry = CollectorRegistry()
registry.register(StoreCollector())


def _broker_ok(url: str) -> str:
    # A plain ping with short timeouts: kombu's own connection check retries for much longer, and
    # probes piling up on a dead broker would hold the threads submissions need to answer 503.
    # The exception's text stays in the log: it may name hosts and users.
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
        return "ok"
    except Exception as exc:  # any failure to connect means the same: not reachable
        log.warning("health check: broker unreachable: %s", exc)
        return "unreachable"


@router.get("/healthz", tags=["health"])
def healthz(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    try:
        session.execute(text("SELECT 1"))
        database = "ok"
    except Exception as exc:  # any failure means the store is not usable
        log.warning("health check: database unreachable: %s", exc)
        database = "unreachable"
    broker = _broker_ok(settings.broker_url)
    healthy = database == "ok" and broker == "ok"
    body = {"status": "ok" if healthy else "degraded", "database": database, "broker": broker}
    return JSONResponse(body, status_code=200 if healthy else 503)


@router.get("/metrics", response_class=Response, tags=["operations"])
def metrics(
    settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> Response:
    """Gauges of jobs, items and queue depths (with GEMMA_BATCH_METRICS_TOKEN, for its bearer
    only)."""
    if settings.metrics_token is not None:
        expected = f"Bearer {settings.metrics_token.get_secret_value()}"
        if not hmac.compare_digest((authorization or "").encode(), expected.encode()):
            return Response(
                "a bearer token is needed (GEMMA_BATCH_METRICS_TOKEN)\n",
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@cache
def _page() -> str:
    return (Path(__file__).parents[1] / "ui" / "index.html").read_text(encoding="utf-8")


class WorkerRead(BaseModel):
    id: str
    host: str
    model: str
    device: str
    quantization: str
    rows_per_second: float  # items stored per second, over its last heartbeat interval
    items_done: int
    started_at: datetime
    last_seen: datetime
    seconds_since_seen: float
    jobs: list[str]  # the caller's own jobs it is running; never another tenant's


@router.get("/v1/workers", tags=["operations"])
def workers(session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> dict[str, Any]:
    """The live workers (heard from within a lease's length), and which of your jobs each runs."""
    found, now = live_workers(session, settings.lease_seconds)
    mine = own_jobs(session, tenant, {job for worker in found for job in worker.jobs})
    data = []
    for worker in found:
        seen = as_utc(worker.last_seen) or now  # SQLite hands back naive UTC
        data.append(
            WorkerRead(
                id=worker.id,
                host=worker.host,
                model=worker.model,
                device=worker.device,
                quantization=worker.quantization,
                rows_per_second=round(worker.rows_per_second, 2),
                items_done=worker.items_done,
                started_at=as_utc(worker.started_at) or seen,
                last_seen=seen,
                seconds_since_seen=round((now - seen).total_seconds(), 1),
                jobs=[job for job in worker.jobs if job in mine],
            )
        )
    return {"object": "list", "data": data}


@router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
def dashboard() -> HTMLResponse:
    """A small jobs dashboard: one static page over the public API."""
    return HTMLResponse(_page())
