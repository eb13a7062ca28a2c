"""Operations: /healthz (store and broker reachable), /metrics (Prometheus), /ui (dashboard)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import redis
from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import text

from api.deps import SessionDep, SettingsDep
from api.ops.metrics import StoreCollector

router = APIRouter()
registry = CollectorRegistry()
registry.register(StoreCollector())


def _broker_ok(url: str) -> str:
    # A plain ping with short timeouts: kombu's own connection check retries for much longer, and
    # probes piling up on a dead broker would hold the threads submissions need to answer 503.
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
        return "ok"
    except Exception as exc:  # any failure to connect means the same: not reachable
        return f"unreachable: {exc}"


@router.get("/healthz", tags=["health"])
def healthz(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    try:
        session.execute(text("SELECT 1"))
        database = "ok"
    except Exception as exc:  # any failure means the store is not usable
        database = f"unreachable: {exc.__class__.__name__}"
    broker = _broker_ok(settings.broker_url)
    healthy = database == "ok" and broker == "ok"
    body = {"status": "ok" if healthy else "degraded", "database": database, "broker": broker}
    return JSONResponse(body, status_code=200 if healthy else 503)


@router.get("/metrics", response_class=Response, tags=["operations"])
def metrics() -> Response:
    """Gauges of jobs, items and queue depths, read at each scrape."""
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@cache
def _page() -> str:
    return (Path(__file__).parents[1] / "ui" / "index.html").read_text(encoding="utf-8")


@router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
def dashboard() -> HTMLResponse:
    """A small jobs dashboard: one static page over the public API."""
    return HTMLResponse(_page())
