"""/healthz: is the store reachable, is the broker reachable."""

from __future__ import annotations

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import SessionDep, SettingsDep

router = APIRouter(tags=["health"])


def _broker_ok(url: str) -> str:
    # A plain ping with short timeouts: kombu's own connection check retries for much longer, and
    # probes piling up on a dead broker would hold the threads submissions need to answer 503.
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
        return "ok"
    except Exception as exc:  # any failure to connect means the same: not reachable
        return f"unreachable: {exc}"


@router.get("/healthz")
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
