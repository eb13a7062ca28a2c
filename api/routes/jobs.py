"""/v1/jobs: submit, watch, download and cancel generation jobs."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep
from gemma_batch import jobs
from gemma_batch.results import csv_lines, jsonl_lines
from gemma_batch.schemas import JobCreate, JobList, JobRead

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202)
async def create_job(request: JobCreate, session: SessionDep, settings: SettingsDep) -> JobRead:
    """Store a job and all its items, then queue them for the workers."""
    # Tokenizing and bulk inserts block; keep them off the event loop.
    job = await run_in_threadpool(jobs.create_job, session, request, settings)
    return JobRead.of(job)


@router.get("")
def list_jobs(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="last_id of the previous page")] = None,
) -> JobList:
    page, has_more = jobs.list_jobs(session, limit, after)
    return JobList(
        data=[JobRead.of(job) for job in page],
        has_more=has_more,
        last_id=page[-1].id if page else None,
    )


@router.get("/{job_id}")
def get_job(job_id: str, session: SessionDep) -> JobRead:
    return JobRead.of(jobs.get_job(session, job_id))


@router.get("/{job_id}/results", response_class=StreamingResponse)
def get_results(
    job_id: str, session: SessionDep, format: Literal["jsonl", "csv"] = "jsonl"
) -> StreamingResponse:
    """Finished items in order, one JSON line (or CSV row) each; partial while the job runs."""
    jobs.get_job(session, job_id)
    if format == "csv":
        return StreamingResponse(csv_lines(job_id), media_type="text/csv")
    return StreamingResponse(jsonl_lines(job_id), media_type="application/x-ndjson")


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, session: SessionDep) -> JobRead:
    return JobRead.of(jobs.cancel_job(session, job_id))
