"""/v1/batches: the OpenAI Batch API, each batch a job underneath."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, TenantDep
from gemma_batch import batches
from gemma_batch.db import newest_first
from gemma_batch.models import Batch
from gemma_batch.openai_schemas import BatchCreate, BatchObject

router = APIRouter(prefix="/v1/batches", tags=["openai"])


def _object(session: SessionDep, batch: Batch) -> BatchObject:
    completed, failed = batches.counts(session, batch)
    return BatchObject.of(batch, completed, failed)


@router.post("")
async def create_batch(
    body: BatchCreate, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> BatchObject:
    """Validate the input file and queue its requests; an unusable file gives a failed batch."""
    batch = await run_in_threadpool(batches.create_batch, session, settings, body, tenant)
    return _object(session, batch)


@router.get("")
def list_batches(
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> dict[str, Any]:
    found, has_more = newest_first(session, Batch, tenant, limit, after)
    data = [_object(session, batches.get_batch(session, settings, b.id, tenant)) for b in found]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0].id if data else None,
        "last_id": data[-1].id if data else None,
        "has_more": has_more,
    }


@router.get("/{batch_id}")
def get_batch(
    batch_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> BatchObject:
    return _object(session, batches.get_batch(session, settings, batch_id, tenant))


@router.post("/{batch_id}/cancel")
def cancel_batch(
    batch_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> BatchObject:
    return _object(session, batches.cancel_batch(session, settings, batch_id, tenant))
