"""OpenAI-style batches: a batch file becomes a job; its lifecycle is read off the job.

validating (inside the create call) -> in_progress -> finalizing -> completed; failed when the
file cannot be used; cancelling -> cancelled; expired past the completion window. The output
and error files are written once, by whichever read first sees the job finished.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.jobs import service as jobs
from api.jobs.ingest import text_problem
from api.jobs.schemas import JobOptions
from api.jobs.service import MAX_ID, NewItem
from api.openai import files
from api.openai.filestore import file_store, open_file
from api.openai.schemas import CONTEXT_ERROR, BatchCreate, CompletionRequest, answer_body, unix
from api.paging import item_pages
from gemma_batch.domain.records import OPEN_JOB_STATES, ItemStatus, JobStatus
from gemma_batch.errors import AppError, FieldError, InvalidRequest, NotFound
from gemma_batch.models.cache import get_prepared
from gemma_batch.settings import Settings
from gemma_batch.store.tables import Batch, Item, Job, utcnow

MAX_ERRORS = 100
LINES_AT_ONCE = 500  # lines gathered before they are written out
FINAL = ("completed", "failed", "expired", "cancelled")


def _error(line: int | None, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "line": line, "message": message, "param": param}


def read_requests(
    settings: Settings, file_id: str, endpoint: str
) -> tuple[list[tuple[str, CompletionRequest]], list[dict[str, Any]]]:
    """Every request line of a batch file, or the problems that make the file unusable."""
    requests: list[tuple[str, CompletionRequest]] = []
    errors: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    model = None
    limit = settings.max_row_bytes
    with open_file(file_store(settings), file_id) as lines:
        for number, raw in enumerate(iter(lambda: lines.readline(limit + 1), b""), start=1):
            if len(errors) >= MAX_ERRORS:
                break
            if len(raw) > limit and not raw.endswith(b"\n"):
                message = f"line {number} is over the limit of {limit} bytes"
                errors.append(_error(number, "line_too_long", message))
                break
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
                line = json.loads(text)
                if not isinstance(line, dict):
                    raise ValueError("not a JSON object")
                # Escapes can spell what no database stores as text.
                if "\\u" in text and (
                    problem := text_problem(json.dumps(line, ensure_ascii=False))
                ):
                    raise ValueError(problem)
            except UnicodeDecodeError as exc:
                message = f"line {number}: not UTF-8 text (byte {exc.start + 1})"
                errors.append(_error(number, "invalid_json_line", message))
                continue
            except ValueError as exc:
                errors.append(_error(number, "invalid_json_line", f"line {number}: {exc}"))
                continue
            custom_id = line.get("custom_id")
            if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_ID:
                message = f"custom_id must be a string of 1 to {MAX_ID} characters"
                errors.append(_error(number, "invalid_custom_id", message, "custom_id"))
                continue
            if custom_id in seen:
                errors.append(
                    _error(
                        number,
                        "duplicate_custom_id",
                        f"custom_id '{custom_id}' repeats line {seen[custom_id]}",
                        "custom_id",
                    )
                )
                continue
            seen[custom_id] = number
            if line.get("method") != "POST":
                errors.append(_error(number, "invalid_method", "method must be POST", "method"))
                continue
            if line.get("url") != endpoint:
                message = f"url must be the batch's endpoint {endpoint}"
                errors.append(_error(number, "mismatched_endpoint", message, "url"))
                continue
            try:
                body = CompletionRequest.model_validate(line.get("body")).for_endpoint(endpoint)
                body.item_params()
            except (ValidationError, ValueError) as exc:
                errors.append(_error(number, "invalid_request", _reason(exc), "body"))
                continue
            except AppError as exc:  # a parameter the service does not honour, named
                errors.append(_error(number, "invalid_request", exc.message, f"body.{exc.param}"))
                continue
            model = model or body.model
            if body.model != model:
                message = f"every request must use one model ({model}), not {body.model}"
                errors.append(_error(number, "mismatched_model", message, "body.model"))
                continue
            if len(requests) == settings.max_batch_requests:
                # Counted as the file is read: a huge file is refused without parsing it all.
                message = f"more than {settings.max_batch_requests} requests"
                errors.append(_error(None, "too_many_requests", message))
                break
            requests.append((custom_id, body))
    if not requests and not errors:
        errors.append(_error(None, "empty_file", "the batch file holds no requests"))
    return requests, errors


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}" if where else first["msg"]
    return str(exc)


def create_batch(session: Session, settings: Settings, body: BatchCreate, tenant: str) -> Batch:
    """Validate the input file and start its job; an unusable file gives a failed batch."""
    if files.get_file(session, body.input_file_id, tenant).purpose != "batch":
        raise InvalidRequest(
            [FieldError("input_file_id", "the input file must be uploaded with purpose 'batch'")]
        )
    now = utcnow()
    batch = Batch(
        tenant=tenant,
        endpoint=body.endpoint,
        input_file_id=body.input_file_id,
        completion_window=body.completion_window,
        status="validating",
        meta=body.metadata,
        created_at=now,
        expires_at=now + timedelta(hours=24),
    )
    requests, errors = read_requests(settings, body.input_file_id, body.endpoint)
    if requests and not errors:
        model = requests[0][1].model
        try:
            get_prepared(settings.model_dir, model)
        except Exception as exc:  # unknown or unprepared: the model cannot serve this batch
            errors.append(_error(1, "model_not_found", str(exc), "body.model"))
    if errors:
        batch.status, batch.errors, batch.failed_at = "failed", errors, now
        session.add(batch)
        session.commit()
        return batch
    model = requests[0][1].model
    # A request asking for several answers (n, or several prompts) is several items in a row,
    # under its custom_id; its output line gathers them again.
    items = (
        NewItem(f"line {number + 1}", custom_id, prompt, messages, params=params)
        for number, (custom_id, request) in enumerate(requests)
        for prompt, messages, params in request.choices()
    )
    options = JobOptions(model=model, metadata={"batch": "yes"})
    # Too-long requests are answered in the error file at run time, not refused here.
    job = jobs.store_job(session, options, items, settings, tenant, check_context=False)
    batch.job_id, batch.model, batch.total = job.id, model, job.total
    batch.status, batch.in_progress_at = "in_progress", utcnow()
    session.add(batch)
    session.commit()
    return batch


def get_batch(session: Session, settings: Settings, batch_id: str, tenant: str) -> Batch:
    """The batch, moved along its lifecycle as far as its job allows."""
    # Another tenant's batch is answered exactly as a missing one.
    batch = session.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant == tenant))
    if batch is None:
        raise NotFound(f"no batch '{batch_id}'", "batch_id")
    if batch.status not in ("in_progress", "cancelling") or batch.job_id is None:
        return batch
    job = jobs.get_job(session, batch.job_id, tenant)
    now = utcnow()
    expires = (
        batch.expires_at if batch.expires_at.tzinfo else batch.expires_at.replace(tzinfo=now.tzinfo)
    )
    if batch.status == "in_progress" and now > expires and job.status in OPEN_JOB_STATES:
        jobs.cancel_job(session, job.id, tenant)
        _finalize(session, settings, batch, job, "expired")
    elif job.status in (JobStatus.COMPLETED, JobStatus.FAILED):
        _finalize(session, settings, batch, job, "completed")
    elif job.status == JobStatus.CANCELLED:
        _finalize(
            session,
            settings,
            batch,
            job,
            "expired" if batch.status == "in_progress" else "cancelled",
        )
    session.refresh(batch)
    return batch


def cancel_batch(session: Session, settings: Settings, batch_id: str, tenant: str) -> Batch:
    """Stop the batch: queued requests are dropped, finished answers kept for the output file."""
    batch = get_batch(session, settings, batch_id, tenant)
    if batch.status == "in_progress" and batch.job_id:
        jobs.cancel_job(session, batch.job_id, tenant)
        batch.status, batch.cancelling_at = "cancelling", utcnow()
        session.commit()
    return batch


def counts(session: Session, batch: Batch) -> tuple[int, int]:
    if batch.job_id is None:
        return 0, 0
    job = session.get(Job, batch.job_id)
    return (job.completed, job.failed) if job else (0, 0)


def _finalize(session: Session, settings: Settings, batch: Batch, job: Job, final: str) -> None:
    # Only one reader wins the move to finalizing, so the files are written once.
    previous = batch.status
    won = session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.status == previous)
        .values(status="finalizing", finalizing_at=utcnow())
    ).rowcount
    session.commit()
    if not won:
        return
    created = unix(batch.created_at) or 0
    written = {}
    try:
        for kind, ok in (("output", True), ("error", False)):
            lines = _lines(batch, job, created, ok=ok, final=final)
            name = f"{batch.id}_{kind}.jsonl"
            record = files.save_blocks(session, settings, lines, name, "batch_output", batch.tenant)
            if record.bytes:
                written[f"{kind}_file_id"] = record.id
            else:  # OpenAI leaves the id empty where there is nothing to report
                files.delete_file(session, settings, record.id, batch.tenant)
    except BaseException:
        # Hand the batch back, so the next read finalizes it again.
        session.rollback()
        session.execute(update(Batch).where(Batch.id == batch.id).values(status=previous))
        session.commit()
        raise
    session.execute(
        update(Batch)
        .where(Batch.id == batch.id)
        .values(status=final, **written, **{f"{final}_at": utcnow()})
    )
    session.commit()


def _requests(job_id: str) -> Iterator[list[Item]]:
    """The job's items grouped by the request they answer (its items are consecutive)."""
    group: list[Item] = []
    for page in item_pages(job_id, list(ItemStatus)):
        for item in page:
            if group and item.custom_id != group[0].custom_id:
                yield group
                group = []
            group.append(item)
    if group:
        yield group


def _lines(batch: Batch, job: Job, created: int, ok: bool, final: str) -> Iterator[bytes]:
    """Output lines (answers) or error lines (failures, and what an expiry left undone)."""
    lines = []
    for items in _requests(job.id):
        line = _line(batch, items, created, final)
        if (
            line is not None
            and (line["error"] is None and line["response"]["status_code"] == 200) == ok
        ):
            lines.append(json.dumps(line) + "\n")
        if len(lines) >= LINES_AT_ONCE:
            yield "".join(lines).encode()
            lines = []
    if lines:
        yield "".join(lines).encode()


def _line(batch: Batch, items: list[Item], created: int, final: str) -> dict[str, Any] | None:
    """One request's line, in OpenAI's shape; None for a request a cancel left undone."""
    first = items[0]
    line_id = f"batch_req_{first.job_id}_{first.index}"
    request_id = f"req_{first.job_id}_{first.index}"
    statuses = {item.status for item in items}
    if statuses == {ItemStatus.COMPLETED}:
        body = answer_body(items, batch.model or "", batch.endpoint, created)
        response = {"status_code": 200, "request_id": request_id, "body": body}
        return {"id": line_id, "custom_id": first.custom_id, "response": response, "error": None}
    failed = next((item for item in items if item.status == ItemStatus.FAILED), None)
    if failed is not None:
        # As OpenAI writes a request that failed: its HTTP answer, with the error in the body.
        message = failed.error or "generation failed"
        context = CONTEXT_ERROR in message
        error = {
            "message": message,
            "type": "invalid_request_error" if context else "server_error",
            "param": None,
            "code": "context_length_exceeded" if context else "generation_failed",
        }
        response = {
            "status_code": 400 if context else 500,
            "request_id": request_id,
            "body": {"error": error},
        }
        return {"id": line_id, "custom_id": first.custom_id, "response": response, "error": None}
    if final != "expired":
        return None
    error = {"code": "batch_expired", "message": "the batch expired before this request ran"}
    return {"id": line_id, "custom_id": first.custom_id, "response": None, "error": error}
