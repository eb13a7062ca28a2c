"""Synchronous completions: one item through the same queue, ahead of batch work, awaited."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.jobs import service as jobs
from api.jobs.schemas import JobOptions
from api.jobs.service import NewItem
from api.openai.schemas import CompletionRequest, answer_body
from gemma_batch.domain.records import INTERACTIVE_PRIORITY, ItemStatus
from gemma_batch.errors import AppError, FieldError, InvalidRequest
from gemma_batch.settings import Settings
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item


class Timeout(AppError):
    status_code = 504
    type = "timeout"


def _submit(request: CompletionRequest, endpoint: str, settings: Settings, tenant: str) -> str:
    chat = endpoint == "/v1/chat/completions"
    item = NewItem(
        "messages" if chat else "prompt",
        "0",
        prompt=None if chat else request.prompt,
        messages=request.chat_messages() if chat else None,
        params=request.item_params(),
    )
    options = JobOptions(model=request.model, metadata={"endpoint": endpoint})
    with session_scope() as session:
        job = jobs.store_job(
            session,
            options,
            [item],
            settings,
            tenant,
            check_context=False,
            priority=INTERACTIVE_PRIORITY,
        )
        return job.id


def _finished(job_id: str) -> Item | None:
    with session_scope() as session:
        item = session.scalars(select(Item).where(Item.job_id == job_id)).one()
        return item if item.status in (ItemStatus.COMPLETED, ItemStatus.FAILED) else None


def _cancel(job_id: str, tenant: str) -> None:
    with session_scope() as session:
        jobs.cancel_job(session, job_id, tenant)


async def complete(
    request: CompletionRequest, endpoint: str, settings: Settings, tenant: str
) -> dict[str, Any]:
    """Queue the request, wait for its answer (polling SQL), and shape it like OpenAI's."""
    try:
        request.for_endpoint(endpoint)
    except ValueError as exc:
        raise InvalidRequest(
            [FieldError("messages" if "chat" in endpoint else "prompt", str(exc))]
        ) from None
    job_id = await run_in_threadpool(_submit, request, endpoint, settings, tenant)
    deadline = time.monotonic() + settings.sync_timeout
    pause = 0.02
    while (item := await run_in_threadpool(_finished, job_id)) is None:
        if time.monotonic() > deadline:
            await run_in_threadpool(_cancel, job_id, tenant)
            raise Timeout(f"no worker answered within {settings.sync_timeout:.0f} s")
        await asyncio.sleep(pause)
        pause = min(pause * 1.5, 0.25)
    if item.status == ItemStatus.FAILED:
        raise AppError(item.error or "generation failed", "messages")
    return answer_body(item, request.model, endpoint, int(time.time()))
