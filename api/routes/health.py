"""/healthz: is the store reachable, is the broker reachable."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import SessionDep
from gemma_batch.queue import celery_app

router = APIRouter(tags=["health"])


def _broker_ok() -> str:
    try:
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as exc:  # any failure to connect means the same: not reachable
        return f"unreachable: {exc}"


@router.get("/healthz")
def healthz(session: SessionDep) -> JSONResponse:
    try:
        session.execute(text("SELECT 1"))
        database = "ok"
    except Exception as exc:  # any failure means the store is not usable
        database = f"unreachable: {exc.__class__.__name__}"
    broker = _broker_ok()
    healthy = database == "ok" and broker == "ok"
    body = {"status": "ok" if healthy else "degraded", "database": database, "broker": broker}
    return JSONResponse(body, status_code=200 if healthy else 503)
