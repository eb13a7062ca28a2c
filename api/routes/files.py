"""/v1/files: the OpenAI Files API, for batch input and output files."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, TenantDep
from gemma_batch import files
from gemma_batch.openai_schemas import FileObject

router = APIRouter(prefix="/v1/files", tags=["openai"])


@router.post("")
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


@router.get("")
def list_files(
    session: SessionDep,
    tenant: TenantDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
) -> dict[str, Any]:
    found = files.list_files(session, tenant, purpose, limit, after)
    data = [FileObject.of(record) for record in found]
    return {"object": "list", "data": data, "has_more": len(found) == limit}


@router.get("/{file_id}")
def get_file(file_id: str, session: SessionDep, tenant: TenantDep) -> FileObject:
    return FileObject.of(files.get_file(session, file_id, tenant))


@router.get("/{file_id}/content", response_class=FileResponse)
def file_content(
    file_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> FileResponse:
    record = files.get_file(session, file_id, tenant)
    return FileResponse(files.path_of(settings, file_id), filename=record.filename)


@router.delete("/{file_id}")
def delete_file(
    file_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> dict[str, Any]:
    files.delete_file(session, settings, file_id, tenant)
    return {"id": file_id, "object": "file", "deleted": True}
