"""Synchronous completions: one item through the same queue, ahead of batch work, awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.jobs import service as jobs
from api.jobs.schemas import JobOptions
from api.jobs.service import NewItem
from api.openai.schemas import CONTEXT_ERROR, CompletionRequest, answer_body
from gemma_batch.dispatch.finished import FinishedJobs
from gemma_batch.domain.records import INTERACTIVE_PRIORITY, ItemStatus
from gemma_batch.errors import AppError
from gemma_batch.settings import Settings
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item

# Wakes sync calls when a worker announces their job finished (the API's lifespan listens).
finished_jobs = FinishedJobs()
# The store is polled too, for a word lost: first after FIRST_POLL seconds, then each pause half
# as long again as the last, up to LONGEST_POLL.
FIRST_POLL, LONGEST_POLL = 0.02, 0.25


class Timeout(AppError):
    """The sync call's job was cancelled: a retry is a new request, so the client is told not to
    make one by itself (the `openai` client honours x-should-retry)."""

    status_code = 504
    type = "timeout"
    code = "timeout"
    headers = {"x-should-retry": "false"}


class GenerationFailed(AppError):
    """The request's item failed: a prompt past the model's context is the caller's to fix."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        if CONTEXT_ERROR in error:
            self.code = "context_length_exceeded"
        else:
            self.status_code, self.type = 500, "server_error"


class ClientGone(AppError):
    """The caller disconnected; nobody reads this answer (499, as nginx logs it)."""

    status_code = 499

    def __init__(self) -> None:
        super().__init__("the client closed the connection; its request was cancelled")


def _submit(request: CompletionRequest, endpoint: str, settings: Settings, tenant: str) -> str:
    chat = endpoint == "/v1/chat/completions"
    items = [
        NewItem("messages" if chat else "prompt", str(index), prompt, messages, params=params)
        for index, (prompt, messages, params) in enumerate(request.choices())
    ]
    options = JobOptions(model=request.model, metadata={"endpoint": endpoint})
    with session_scope() as session:
        job = jobs.store_job(
            session,
            options,
            items,
            settings,
            tenant,
            check_context=False,
            priority=INTERACTIVE_PRIORITY,
        )
        return job.id


def _finished(job_id: str) -> list[Item] | None:
    """The job's items in choice order once every one has ended, else None."""
    with session_scope() as session:
        items = list(
            session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.index))
        )
    done = (ItemStatus.COMPLETED, ItemStatus.FAILED)
    return items if all(item.status in done for item in items) else None


def _cancel(job_id: str, tenant: str) -> None:
    with session_scope() as session:
        jobs.cancel_job(session, job_id, tenant)


async def complete(
    request: CompletionRequest,
    endpoint: str,
    settings: Settings,
    tenant: str,
    gone: Callable[[], Awaitable[bool]],
) -> dict[str, Any]:
    """Queue the request, wait for its answer, and shape it like OpenAI's. The answer is read
    from SQL when the worker announces the job finished, or at the latest at the next poll.

    A caller that gives up (it disconnects, or the wait passes GEMMA_BATCH_SYNC_TIMEOUT) has its
    job cancelled, so client retries never pile up work.
    """
    request.for_endpoint(endpoint)
    job_id = await run_in_threadpool(_submit, request, endpoint, settings, tenant)
    deadline = time.monotonic() + settings.sync_timeout
    pause = FIRST_POLL
    with finished_jobs.watching(job_id) as word:
        while (items := await run_in_threadpool(_finished, job_id)) is None:
            if await gone():
                await run_in_threadpool(_cancel, job_id, tenant)
                raise ClientGone()
            if time.monotonic() > deadline:
                await run_in_threadpool(_cancel, job_id, tenant)
                raise Timeout(
                    f"no worker answered within {settings.sync_timeout:.0f} s; the request was "
                    "cancelled: send it again later, or raise GEMMA_BATCH_SYNC_TIMEOUT"
                )
            with suppress(TimeoutError):
                await asyncio.wait_for(word.wait(), pause)
            word.clear()
            pause = min(pause * 1.5, LONGEST_POLL)
    failed = next((item for item in items if item.status == ItemStatus.FAILED), None)
    if failed is not None:
        raise GenerationFailed(failed.error or "generation failed")
    return answer_body(items, request.model, endpoint, int(time.time()))
