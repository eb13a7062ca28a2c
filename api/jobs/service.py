"""Job services used by the API and the CLI: create, read, list and cancel jobs."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from typing import IO, Any

import httpx
from sqlalchemy import bindparam, delete, func, insert, select, text, update
from sqlalchemy.orm import Session

from api.jobs.ingest import detect_format, iter_rows
from api.jobs.schemas import FileJob, JobCreate, JobOptions
from api.jobs.templates import Template
from api.jobs.webhooks import Allowlist, TargetRefused, check_url
from gemma_batch.dispatch.dispatcher import Release, release, send
from gemma_batch.domain.chat import gemma_turns
from gemma_batch.domain.records import (
    BATCH_PRIORITY,
    FINISHED_JOB_STATES,
    INTERACTIVE_PRIORITY,
    OPEN_JOB_STATES,
    ItemStatus,
    JobStatus,
)
from gemma_batch.errors import (
    Conflict,
    FieldError,
    IdempotencyKeyReused,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    TooManyQueued,
)
from gemma_batch.models.cache import PreparedModel, get_prepared
from gemma_batch.settings import Settings
from gemma_batch.store.tables import Item, Job, db_now, utcnow

log = logging.getLogger(__name__)

INSERT_BATCH = 2000
MAX_ID = 256  # the longest caller's id the items table keeps
# Tokens the Gemma turn format adds around a prompt in chat mode.
CHAT_OVERHEAD = 8


@dataclass(frozen=True)
class NewItem:
    where: str  # where the caller put it, for errors: "items[3]" or "line 7"
    custom_id: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    fields: dict[str, Any] | None = None
    params: dict[str, Any] | None = None


def _too_long(length: int, limit: int) -> str:
    return f"the prompt is {length} characters, over the limit of {limit}"


def _check_prompt_chars(batch: list[NewItem], limit: int) -> None:
    """Refuse overlong prompts by their length alone, before any time goes into tokenizing."""
    lengths = {
        item.where: len(item.prompt)
        if item.prompt is not None
        else sum(len(message["content"]) for message in item.messages or [])
        for item in batch
    }
    errors = [
        FieldError(where, _too_long(length, limit))
        for where, length in lengths.items()
        if length > limit
    ]
    if errors:
        raise InvalidRequest(errors)


# The queries every submission makes, built once: building a statement costs several times
# what running it does, and each small job's submission takes its CPU from the workers.
_QUEUED = select(func.coalesce(func.sum(Job.total - Job.completed - Job.failed), 0)).where(
    Job.tenant == bindparam("tenant"), Job.status.in_(OPEN_JOB_STATES)
)
_OTHER_OPEN = (
    select(Job.id)
    .where(
        Job.model == bindparam("model"),
        Job.status.in_(OPEN_JOB_STATES),
        Job.id != bindparam("job_id"),
    )
    .limit(1)
)


def queued_items(session: Session, tenant: str) -> int:
    """How many of the tenant's items are still to be done, in its queued and running jobs."""
    return session.scalar(_QUEUED, {"tenant": tenant}) or 0


def _check_context(model: PreparedModel, options: JobOptions, batch: list[NewItem]) -> None:
    """Refuse prompts that, with the tokens asked for, would not fit the model's context."""
    overhead = model.count_tokens([options.prefix])[0] if options.prefix else 0
    if options.chat:
        overhead += CHAT_OVERHEAD
    limit, wanted = model.context_length, options.params.max_new_tokens
    if options.choices:  # a label needs room for its longest choice, not for generation
        wanted = max(model.count_tokens([" " + choice for choice in options.choices]))
    texts = {
        item.where: item.prompt if item.prompt is not None else gemma_turns(item.messages or [])
        for item in batch
    }
    # Gemma's tokenizer never makes more tokens than UTF-8 bytes (plus <bos>), so only texts
    # long enough to matter are tokenized: counting every row would dominate a big upload.
    doubtful = [
        where for where, text in texts.items() if len(text.encode()) + 1 + overhead + wanted > limit
    ]
    counts = model.count_tokens([texts[where] for where in doubtful])
    errors = [
        FieldError(
            where,
            f"the prompt is {tokens + overhead} tokens; with max_new_tokens {wanted} it exceeds "
            f"{options.model}'s context of {limit} tokens",
        )
        for where, tokens in zip(doubtful, counts, strict=True)
        if tokens + overhead + wanted > limit
    ]
    if errors:
        raise InvalidRequest(errors)


def create_job(
    session: Session,
    request: JobCreate,
    settings: Settings,
    tenant: str,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> Job:
    """A job from a JSON body of prompts or chats."""
    if len(request.items) > settings.max_items:
        raise InvalidRequest([FieldError("items", f"more than the limit of {settings.max_items}")])
    items = (
        NewItem(
            f"items[{index}].{'prompt' if item.prompt is not None else 'messages'}",
            item.id if item.id is not None else str(index),
            item.prompt,
            None if item.messages is None else [m.model_dump() for m in item.messages],
        )
        for index, item in enumerate(request.items)
    )
    return store_job(
        session,
        request,
        items,
        settings,
        tenant,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )


def create_job_from_file(
    session: Session,
    upload: IO[bytes],
    filename: str | None,
    request: FileJob,
    settings: Settings,
    tenant: str,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> Job:
    """A job from an uploaded file: each row is put through the template, its fields kept."""
    template = Template(request.template)
    fmt = detect_format(filename, request.format)
    columns = ColumnTypes()
    rows = iter_rows(
        upload,
        fmt,
        max_row_bytes=settings.max_row_bytes,
        max_field_chars=max(settings.max_prompt_chars, settings.max_row_bytes),
    )

    def items() -> Iterator[NewItem]:
        for index, (where, row) in enumerate(rows):
            missing = template.missing(row)
            if missing:
                raise _file_error(f"{where}: no field '{missing[0]}', which the template needs")
            size = row_bytes(row)
            if size > settings.max_row_bytes:
                raise _file_error(
                    f"{where}: is {size} bytes, over the limit of {settings.max_row_bytes} a row"
                )
            columns.add(row)
            row_id = row.get(request.id_field)
            if row_id is not None and len(str(row_id)) > MAX_ID:
                raise _file_error(f"{where}: its id is over {MAX_ID} characters")
            length = template.rendered_length(row)
            if length > settings.max_prompt_chars:
                raise InvalidRequest(
                    [FieldError(where, _too_long(length, settings.max_prompt_chars))]
                )
            prompt = template.render(row)
            yield NewItem(where, str(index if row_id is None else row_id), prompt, fields=row)

    return store_job(
        session,
        request,
        items(),
        settings,
        tenant,
        template=request.template,
        columns=columns,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        unique_ids=True,
    )


def _file_error(message: str) -> InvalidRequest:
    return InvalidRequest([FieldError("file", message)])


def row_bytes(row: dict[str, Any]) -> int:
    """About what a row takes stored as JSON: exact for text, the JSON of anything else."""
    size = 2
    for key, value in row.items():
        size += len(key) + 6
        if isinstance(value, str):
            size += len(value) if value.isascii() else len(value.encode())
        else:
            size += len(json.dumps(value))
    return size


class ColumnTypes:
    """Each field's type over every row, so exports can give a column one type from the start:
    int and float make float; any other mix, text."""

    def __init__(self) -> None:
        self.types: dict[str, str] = {}  # in order of first appearance

    def add(self, row: dict[str, Any]) -> None:
        for name, value in row.items():
            kind = _kind(value)
            known = self.types.get(name)
            if known is None or known == "null":
                self.types[name] = kind
            elif kind not in ("null", known):
                self.types[name] = "float" if {known, kind} == {"int", "float"} else "text"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "text"  # strings, and lists or objects, which exports write as JSON text


def store_job(
    session: Session,
    options: JobOptions,
    items: Iterable[NewItem],
    settings: Settings,
    tenant: str,
    template: str | None = None,
    columns: ColumnTypes | None = None,
    check_context: bool = True,
    priority: int = BATCH_PRIORITY,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    unique_ids: bool = False,
) -> Job:
    """Store the job and all its items, then release its first chunks to the broker.

    Items arrive as a stream and go in by batches, each its own short transaction when there is
    more than one, so a huge upload never sits in memory nor holds the database from other
    tenants' submissions. Until its last row is in, such a job is `uploading`: no worker,
    listing or queue count sees it, and any bad item removes it whole, so nothing half-made is
    ever seen. The tenant's queue limit is then checked and the job made `queued` in one step,
    under a per-tenant lock. A job of one batch goes in `queued`, as it will stay, in one
    transaction that the same check ends.
    """
    model = get_prepared(settings.model_dir, options.model)
    if options.callback_url is not None:
        _check_callback(options, settings)
    spec = options.spec()
    queued = queued_items(session, tenant)
    sync = priority == INTERACTIVE_PRIORITY
    iterator = iter(items)
    first = list(islice(iterator, INSERT_BATCH))
    # A job of one batch goes in as one short transaction, its row written once, as it will
    # stay; only a bigger one is committed batch by batch while it stays invisible.
    whole = len(first) < INSERT_BATCH
    job = Job(
        tenant=tenant,
        model=model.served_by,
        adapter=model.name if model.base else None,
        status=JobStatus.QUEUED if whole else JobStatus.UPLOADING,
        created_at=db_now(session),  # the sweep's clock, whatever this host's says
        params=spec.params.model_dump(),
        prefix=spec.prefix or None,
        chat=spec.chat,
        choices=spec.choices,
        json_schema=spec.json_schema,
        template=template,
        meta=options.metadata,
        callback_url=str(options.callback_url) if options.callback_url else None,
        webhook_status="pending" if options.callback_url else None,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        priority=priority,
    )
    if whole:
        _set_totals(session, job, len(first), columns, settings, sync)
    session.add(job)
    # With a key, a concurrent retry fails here on the unique key, and finds this job.
    if whole:
        session.flush()
    else:
        session.commit()
    try:
        rows = chain(first, iterator)
        total = _insert_all(
            session, job, options, model, rows, settings, queued, check_context, whole
        )
        if unique_ids:
            _check_unique_ids(session, job.id)
        if not whole:
            _set_totals(session, job, total, columns, settings, sync)
        _publish(session, job, settings, whole)
    except BaseException:
        session.rollback()
        if not whole:
            _remove(session, job.id)
        raise
    if sync:
        size = settings.chunk_size
        sizes = [min(size, job.total - start) for start in range(0, job.total, size)]
        releases = [Release(job.id, job.model, c, n, priority) for c, n in enumerate(sizes)]
    else:
        # An idle model's window's room at once rather than on the dispatcher's next tick. Beside
        # other open jobs, the next tick releases this one's chunks, fairly among the rest,
        # within dispatch_interval: a burst of small jobs is then released a tick's worth at a
        # time rather than each by a release of its own, whose queries grow with the open jobs
        # and take CPU from the workers on a small machine.
        try:
            releases = [] if _busy(session, job) else release(session, job.model, settings)
            session.commit()
        except Exception:  # a deadlock, say: the job is in, and the dispatcher will release it
            session.rollback()
            log.warning("job %s: not released at submit, the dispatcher will", job.id, exc_info=1)
            releases = []
    try:
        send(releases)
    except Exception as exc:  # kombu raises several kinds for an unreachable broker
        # Nothing half-done stays behind: the job is removed and the caller may simply retry.
        log.error("broker unreachable, dropping job %s: %s", job.id, exc)
        _remove(session, job.id)
        raise ServiceUnavailable("the job queue is unreachable; nothing was stored") from exc
    log.info("job %s: %s items in %s chunks for %s", job.id, job.total, job.chunks, job.model)
    return job


def _set_totals(
    session: Session,
    job: Job,
    total: int,
    columns: ColumnTypes | None,
    settings: Settings,
    sync: bool,
) -> None:
    """What the job holds, once its rows are all known."""
    job.total = total
    job.chunks = -(-total // settings.chunk_size)
    job.column_types = columns.types if columns is not None else None
    job.columns = list(columns.types) if columns is not None else None
    # A sync request goes out whole, past any window: released as it is published.
    job.released = job.chunks if sync else 0
    job.dispatched_at = db_now(session) if sync else None


def _busy(session: Session, job: Job) -> bool:
    """Whether another job of the model is open."""
    return session.scalar(_OTHER_OPEN, {"model": job.model, "job_id": job.id}) is not None


def _check_callback(options: JobOptions, settings: Settings) -> None:
    try:
        check_url(httpx.URL(str(options.callback_url)), Allowlist.parse(settings.webhook_allow))
    except TargetRefused as exc:
        raise InvalidRequest([FieldError("callback_url", str(exc))]) from None


def _insert_all(
    session: Session,
    job: Job,
    options: JobOptions,
    model: PreparedModel,
    items: Iterable[NewItem],
    settings: Settings,
    queued: int,
    check_context: bool,
    whole: bool,
) -> int:
    size, total = settings.chunk_size, 0
    iterator = iter(items)
    while batch := list(islice(iterator, INSERT_BATCH)):
        if total + len(batch) > settings.max_items:
            raise _file_error(f"more rows than the limit of {settings.max_items}")
        # An early refusal, before the rows are stored; _publish makes the exact check.
        if queued + total + len(batch) > settings.max_queued_items:
            raise TooManyQueued(queued, settings.max_queued_items)
        _check_prompt_chars(batch, settings.max_prompt_chars)
        if check_context:
            _check_context(model, options, batch)
        insert_items(session, job.id, batch, total, size)
        if not whole:  # a big job: each batch its own transaction
            session.commit()
        total += len(batch)
    if total == 0:
        raise _file_error("holds no rows")
    return total


def _check_unique_ids(session: Session, job_id: str) -> None:
    repeated = session.execute(
        select(Item.custom_id, func.min(Item.index), func.max(Item.index))
        .where(Item.job_id == job_id)
        .group_by(Item.custom_id)
        .having(func.count() > 1)
        .order_by(func.min(Item.index))
        .limit(1)
    ).first()
    if repeated is not None:
        custom_id, first, last = repeated
        raise _file_error(f"rows {first + 1} and {last + 1} both have the id '{custom_id}'")


def _publish(session: Session, job: Job, settings: Settings, whole: bool) -> None:
    """Commit the stored job `queued` unless that puts its tenant over the queue limit.

    The job's own write comes first (the insert of a job of one batch, the update of a bigger
    one): on SQLite it takes the database's write lock, so the count after it sees every other
    publication; PostgreSQL takes a lock on the tenant.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:tenant))"), {"tenant": job.tenant}
        )
    if not whole:
        session.flush()  # the totals just set on the job, then the update that publishes it
        published = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.UPLOADING)
            .values(status=JobStatus.QUEUED)
        ).rowcount
        if not published:
            raise Conflict(f"job '{job.id}' was cancelled while its rows went in", "job_id")
    queued = queued_items(session, job.tenant)
    if queued > settings.max_queued_items:
        raise TooManyQueued(queued - job.total, settings.max_queued_items)
    session.commit()
    if not whole:
        session.refresh(job)


def _remove(session: Session, job_id: str) -> None:
    """Delete a job that never was: its rows a batch at a time, so the database stays free."""
    while session.execute(
        delete(Item).where(
            Item.id.in_(select(Item.id).where(Item.job_id == job_id).limit(INSERT_BATCH))
        )
    ).rowcount:
        session.commit()
    session.execute(delete(Job).where(Job.id == job_id))
    session.commit()


# Item columns written at submission; the last three hold JSON.
ITEM_COLUMNS = (
    "job_id", "index", "chunk", "custom_id", "prompt", "status", "attempts",
    "messages", "fields", "params",
)  # fmt: skip


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def insert_items(
    session: Session, job_id: str, batch: list[NewItem], first: int, size: int
) -> None:
    """Insert a batch of items; on PostgreSQL with COPY, several times faster than INSERTs."""
    pending = ItemStatus.PENDING.value
    rows = [
        (job_id, index, index // size, item.custom_id, item.prompt, pending, 0)
        + (item.messages, item.fields, item.params)
        for index, item in enumerate(batch, start=first)
    ]
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        session.execute(insert(Item), [dict(zip(ITEM_COLUMNS, row, strict=True)) for row in rows])
        return
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    columns = ", ".join(f'"{name}"' for name in ITEM_COLUMNS)
    with cursor.copy(f"COPY items ({columns}) FROM STDIN") as copy:
        for *plain, messages, fields, params in rows:
            copy.write_row((*plain, _json(messages), _json(fields), _json(params)))


def find_submission(session: Session, tenant: str, idempotency_key: str) -> Job | None:
    """The tenant's job first submitted with this Idempotency-Key, if any."""
    return session.scalar(
        select(Job).where(Job.tenant == tenant, Job.idempotency_key == idempotency_key)
    )


def same_submission(job: Job, request_hash: str) -> Job:
    """The job a retry asks for; a different request under its key is refused."""
    if job.request_hash is not None and job.request_hash != request_hash:
        raise IdempotencyKeyReused()
    return job


def get_job(session: Session, job_id: str, tenant: str) -> Job:
    # Another tenant's job is answered exactly as a missing one, so ids cannot be probed.
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant == tenant))
    if job is None:
        raise NotFound(f"no job '{job_id}'", "job_id")
    return job


def label_counts(session: Session, job_id: str, tenant: str) -> dict[str, int]:
    job = get_job(session, job_id, tenant)
    counted = session.execute(
        select(Item.label, func.count())
        .where(Item.job_id == job.id, Item.label.is_not(None))
        .group_by(Item.label)
    ).all()
    found = {label: count for label, count in counted}
    # In the job's own order, every choice shown even before it is given once.
    return {choice: found.get(choice, 0) for choice in job.choices or sorted(found)}


def cancel_job(session: Session, job_id: str, tenant: str) -> Job:
    """Stop a job: pending items are cancelled, finished ones stay downloadable."""
    job = get_job(session, job_id, tenant)
    # Conditional, so a job that a worker has just finished is never turned into a cancelled one.
    changed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.not_in(FINISHED_JOB_STATES))
        .values(status=JobStatus.CANCELLED, finished_at=utcnow())
    ).rowcount
    if not changed:
        session.rollback()
        session.refresh(job)
        raise Conflict(f"job '{job_id}' is already {job.status}", "job_id")
    session.execute(
        update(Item)
        .where(Item.job_id == job_id, Item.status == ItemStatus.PENDING)
        .values(status=ItemStatus.CANCELLED)
    )
    session.commit()
    session.refresh(job)
    return job
