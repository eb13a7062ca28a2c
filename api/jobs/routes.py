"""/v1/jobs: submit, watch, download and cancel generation jobs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import partial
from typing import IO, Annotated, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.deps import SessionDep, SettingsDep, TenantDep
from api.jobs import service as jobs
from api.jobs.exports import EXPORTS
from api.jobs.forms import job_request_body, parse_form, parse_json
from api.jobs.schemas import FileJob, JobCreate, JobList, job_read
from api.paging import page
from gemma_batch.domain.records import JobRead, JobStatus
from gemma_batch.errors import FieldError, InvalidRequest
from gemma_batch.settings import Settings
from gemma_batch.store.tables import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="Makes a retried submission return the first job instead of a second one.",
    ),
]


@router.post("", status_code=202, openapi_extra=job_request_body())
async def create_job(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    idempotency_key: IdempotencyKey = None,
) -> JobRead:
    """Store a job and all its items, then queue them for the workers.

    Takes JSON (`items` of prompts or chats) or a multipart upload (`file` in JSONL, CSV or
    Parquet, with a `template` and the job settings as form fields). With an Idempotency-Key, a
    retry of the same request returns the first job; another request under it is refused (422).
    """
    # Tokenizing, hashing and bulk inserts block; they run off the event loop.
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form(max_part_size=settings.max_body_bytes) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise InvalidRequest([FieldError("file", "attach the rows as a file field 'file'")])
            options = parse_form(FileJob, {k: v for k, v in form.items() if k != "file"})
            digest = None
            if idempotency_key:
                digest = await run_in_threadpool(_upload_hash, options, upload.file)
                if first := jobs.find_submission(session, tenant, idempotency_key):
                    return job_read(jobs.same_submission(first, digest))
            store = partial(
                jobs.create_job_from_file, session, upload.file, upload.filename, options
            )
            job = await _stored(store, session, settings, tenant, idempotency_key, digest)
    else:
        body = parse_json(JobCreate, await request.body())
        digest = None
        if idempotency_key:
            digest = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
            if first := jobs.find_submission(session, tenant, idempotency_key):
                return job_read(jobs.same_submission(first, digest))
        store = partial(jobs.create_job, session, body)
        job = await _stored(store, session, settings, tenant, idempotency_key, digest)
    return job_read(job)


def _upload_hash(options: FileJob, file: IO[bytes]) -> str:
    digest = hashlib.sha256(options.model_dump_json().encode())
    for block in iter(lambda: file.read(1 << 20), b""):
        digest.update(block)
    file.seek(0)
    return digest.hexdigest()


async def _stored(
    store: Callable[..., Job],
    session: Session,
    settings: Settings,
    tenant: str,
    idempotency_key: str | None,
    digest: str | None,
) -> Job:
    try:
        return await run_in_threadpool(store, settings, tenant, idempotency_key, digest)
    except IntegrityError:
        # The same key stored by a concurrent request a moment ago: that one is the job.
        session.rollback()
        first = jobs.find_submission(session, tenant, idempotency_key) if idempotency_key else None
        if first is None or digest is None:
            raise
        return jobs.same_submission(first, digest)


@router.get("")
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="last_id of the previous page")] = None,
) -> JobList:
    # A job still taking its rows in is not listed until they are all in.
    visible = [Job.status != JobStatus.UPLOADING]
    jobs_page, has_more = page(session, Job, tenant, limit, after, visible)
    return JobList(
        data=[job_read(job) for job in jobs_page],
        has_more=has_more,
        last_id=jobs_page[-1].id if jobs_page else None,
    )


@router.get("/{job_id}")
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobRead:
    return job_read(jobs.get_job(session, job_id, tenant))


@router.get("/{job_id}/results", response_class=StreamingResponse)
def get_results(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    format: Literal["jsonl", "csv", "parquet"] = "jsonl",
) -> StreamingResponse:
    """Finished items in order, joined to their original fields; partial while the job runs."""
    job = jobs.get_job(session, job_id, tenant)
    export = EXPORTS[format]
    return StreamingResponse(
        export.write(job),
        media_type=export.media_type,
        headers={"content-disposition": f'attachment; filename="{job_id}.{format}"'},
    )


@router.get("/{job_id}/labels")
def get_label_counts(job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, object]:
    """How many items got each label so far (label jobs; empty for others)."""
    return {"object": "label_counts", "data": jobs.label_counts(session, job_id, tenant)}


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobRead:
    return job_read(jobs.cancel_job(session, job_id, tenant))
