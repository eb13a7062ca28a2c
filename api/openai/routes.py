"""The OpenAI-compatible routes: /v1/files, /v1/batches, chat and text completions, models."""

from __future__ import annotations

from itertools import chain
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, TenantDep
from api.openai import batches, files
from api.openai.completions import complete
from api.openai.filestore import file_store
from api.openai.schemas import (
    BatchCreate,
    BatchObject,
    CompletionRequest,
    FileObject,
    ModelObject,
)
from api.paging import page
from gemma_batch.models.cache import PreparedModel, UnknownModel, get_prepared, prepared_names
from gemma_batch.store.tables import Batch, File

router = APIRouter(prefix="/v1", tags=["openai"])


def _page_of(data: list[FileObject] | list[BatchObject], has_more: bool) -> dict[str, Any]:
    """A page of a list, as OpenAI's list endpoints answer it."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0].id if data else None,
        "last_id": data[-1].id if data else None,
        "has_more": has_more,
    }


# --- Files: batch input and output files ---------------------------------------------------


@router.post("/files")
async def upload_file(
    file: UploadFile,
    purpose: Annotated[str, Form()],
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
) -> FileObject:
    """Store a file (streamed to the files folder, never held whole in memory)."""
    name = file.filename or "upload.jsonl"
    record = await run_in_threadpool(
        files.save_upload, session, settings, file.file, name, purpose, tenant
    )
    return FileObject.of(record)


@router.get("/files")
def list_files(
    session: SessionDep,
    tenant: TenantDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    where = [File.purpose == purpose] if purpose else []
    found, has_more = page(session, File, tenant, limit, after, where, newest=order == "desc")
    return _page_of([FileObject.of(record) for record in found], has_more)


@router.get("/files/{file_id}")
def get_file(file_id: str, session: SessionDep, tenant: TenantDep) -> FileObject:
    return FileObject.of(files.get_file(session, file_id, tenant))


@router.get("/files/{file_id}/content", response_class=StreamingResponse)
def file_content(
    file_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> StreamingResponse:
    record = files.get_file(session, file_id, tenant)
    name, size = record.filename, record.bytes
    # The request's session is closed only after the response: a long download must not hold a
    # connection (the SQL store takes one per block, for a moment).
    session.close()
    blocks = file_store(settings).blocks(file_id)
    first = next(blocks, b"")  # contents gone from the store: an error now, not a cut-off body
    return StreamingResponse(
        chain([first], blocks),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": _attachment(name),
        },
    )


def _attachment(filename: str) -> str:
    # As Starlette's FileResponse writes it: RFC 6266's encoded form when the name needs it.
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'


@router.delete("/files/{file_id}")
def delete_file(
    file_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> dict[str, Any]:
    files.delete_file(session, settings, file_id, tenant)
    return {"id": file_id, "object": "file", "deleted": True}


# --- Batches: each batch a job underneath --------------------------------------------------


def _batch_object(session: SessionDep, batch: Batch) -> BatchObject:
    completed, failed = batches.counts(session, batch)
    return BatchObject.of(batch, completed, failed)


@router.post("/batches")
async def create_batch(
    body: BatchCreate, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> BatchObject:
    """Validate the input file and queue its requests; an unusable file gives a failed batch."""
    batch = await run_in_threadpool(batches.create_batch, session, settings, body, tenant)
    return _batch_object(session, batch)


@router.get("/batches")
def list_batches(
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> dict[str, Any]:
    found, has_more = page(session, Batch, tenant, limit, after)
    data = [
        _batch_object(session, batches.get_batch(session, settings, b.id, tenant)) for b in found
    ]
    return _page_of(data, has_more)


@router.get("/batches/{batch_id}")
def get_batch(
    batch_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> BatchObject:
    return _batch_object(session, batches.get_batch(session, settings, batch_id, tenant))


@router.post("/batches/{batch_id}/cancel")
def cancel_batch(
    batch_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> BatchObject:
    return _batch_object(session, batches.cancel_batch(session, settings, batch_id, tenant))


# --- Completions and models ----------------------------------------------------------------


@router.post("/chat/completions")
async def chat_completions(
    body: CompletionRequest, request: Request, settings: SettingsDep, tenant: TenantDep
) -> dict[str, Any]:
    """Answered by the workers through the job queue, ahead of batch work."""
    return await complete(body, "/v1/chat/completions", settings, tenant, request.is_disconnected)


@router.post("/completions")
async def completions(
    body: CompletionRequest, request: Request, settings: SettingsDep, tenant: TenantDep
) -> dict[str, Any]:
    return await complete(body, "/v1/completions", settings, tenant, request.is_disconnected)


def _model_object(model: PreparedModel) -> ModelObject:
    return ModelObject(id=model.name, created=model.prepared_at, parent=model.base)


@router.get("/models")
def models(settings: SettingsDep) -> dict[str, Any]:
    """The models and adapters prepared here, which the workers can serve."""
    data = []
    for name in prepared_names(settings.model_dir):
        try:
            data.append(_model_object(get_prepared(settings.model_dir, name)))
        except UnknownModel:  # an adapter whose base was removed: nothing can serve it
            continue
    return {"object": "list", "data": data}


@router.get("/models/{model}")
def model(model: str, settings: SettingsDep) -> ModelObject:
    return _model_object(get_prepared(settings.model_dir, model))
