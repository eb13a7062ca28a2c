"""The HTTP edge: builds the FastAPI app. It never imports torch or transformers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from api.deps import current_tenant
from api.errors import install_error_handlers
from api.jobs.forms import install_body_schemas
from api.jobs.routes import router as jobs_router
from api.jobs.webhooks import deliver_forever
from api.limits import BodySizeLimit
from api.openai.completions import finished_jobs
from api.openai.routes import router as openai_router
from api.ops.routes import router as ops_router
from gemma_batch.dispatch.dispatcher import dispatch_forever
from gemma_batch.settings import get_settings

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    if not settings.auth:
        log.warning(
            "AUTH IS OFF (GEMMA_BATCH_AUTH=false): anyone who can reach this API can read and "
            "submit every job as the 'default' tenant. Use this for local work only."
        )
    # Webhooks, the dispatcher (with the sweep for lost tasks) and the listener for finished
    # jobs (which wakes sync calls) run in the API process, which every stack runs.
    loops = [
        asyncio.create_task(deliver_forever(settings)),
        asyncio.create_task(dispatch_forever(settings)),
        asyncio.create_task(finished_jobs.listen_forever(settings)),
    ]
    yield
    for loop in loops:
        loop.cancel()


def create_app() -> FastAPI:
    app = FastAPI(
        title="gemma-batch",
        lifespan=lifespan,
        summary="Batch generation and labelling with Gemma models",
        version="0.1.0",
    )
    # Everything under /v1 needs an API key; /healthz, /metrics and the /ui page stay open.
    for router in (jobs_router, openai_router):
        app.include_router(router, dependencies=[Depends(current_tenant)])
    app.include_router(ops_router)
    install_error_handlers(app)
    install_body_schemas(app)
    settings = get_settings()
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.max_body_bytes, max_upload_bytes=settings.max_upload_bytes
    )
    return app


app = create_app()
