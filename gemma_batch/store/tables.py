"""The SQL tables, shared by the API and the workers. SQL is the source of truth."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from gemma_batch.domain.records import BATCH_PRIORITY, ItemStatus, JobStatus

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def db_now(session: Session) -> datetime:
    """The store's clock: what leases, their expiry and the sweep's decisions are reckoned in.

    On PostgreSQL the server's own clock (clock_timestamp(): this very moment, not the
    transaction's start), so machines whose clocks disagree still agree on when a lease ends.
    The SQLite store is a file on one machine, whose processes share its clock.
    """
    if session.get_bind().dialect.name == "postgresql":
        moment = session.scalar(select(func.clock_timestamp()))
        assert moment is not None
        return moment.astimezone(UTC)
    return utcnow()


def as_utc(moment: datetime | None) -> datetime | None:
    """A stored moment with its time zone: SQLite hands back naive datetimes, all of them UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def new_id(prefix: str) -> str:
    # Time first, so ids sort by creation and serve as listing cursors.
    return f"{prefix}{time.time_ns():016x}{secrets.token_hex(4)}"


def new_job_id() -> str:
    return new_id("job_")


# Rows made before tenants existed, and every request while auth is off, belong to this one.
DEFAULT_TENANT = "default"


def tenant_column() -> Mapped[str]:
    """Who owns the row: every read and list filters on it, so another tenant sees a 404."""
    return mapped_column(String(64), index=True, server_default=DEFAULT_TENANT)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        dict[str, Any]: JSON,
        list[dict[str, Any]]: JSON,
        list[str]: JSON,
        dict[str, float]: JSON,
    }


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # A retried submission with the same Idempotency-Key finds its tenant's first job.
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_job_id)
    tenant: Mapped[str] = tenant_column()
    # The model whose workers run the job (its queue); with `adapter`, that adapter's base.
    model: Mapped[str] = mapped_column(String(200))
    adapter: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED, index=True)
    # Lower first: sync requests (/v1/chat/completions) take free slots before batch work.
    priority: Mapped[int] = mapped_column(Integer, default=BATCH_PRIORITY, server_default=text("6"))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    # How each item becomes a prompt, and what is asked of the model (see JobSpec).
    template: Mapped[str | None] = mapped_column(Text)
    prefix: Mapped[str | None] = mapped_column(Text)
    chat: Mapped[bool] = mapped_column(default=False, server_default=false())
    choices: Mapped[list[str] | None] = mapped_column(JSON)
    json_schema: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The uploaded file's field names in order, so exports keep the caller's columns.
    columns: Mapped[list[str] | None] = mapped_column(JSON)
    # "metadata" is reserved on declarative classes, hence the attribute name.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    # Where to POST the signed job summary once the job is over, and how that went: the outbox
    # (pending until received or given up; the next attempt not before webhook_next_at).
    callback_url: Mapped[str | None] = mapped_column(Text)
    webhook_status: Mapped[str | None] = mapped_column(String(16))
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    webhook_next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    webhook_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    webhook_error: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # SHA-256 of what was submitted with the key: the same key with another body is refused.
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # Each uploaded field's type over all rows (int, float, bool, text), for typed exports.
    column_types: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Its chunks (numbered from 0), and how many of them the dispatcher has released to the
    # broker so far, in order: workers pull only from released chunks (gemma_batch.dispatch).
    chunks: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    released: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # When a chunk was last released; the sweep gives a message that long to be taken.
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    items: Mapped[list[Item]] = relationship(back_populates="job", passive_deletes=True)


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (
        # One row per (job, index): a repeated write can never duplicate a result.
        UniqueConstraint("job_id", "index", name="uq_items_job_id_index"),
        Index("ix_items_job_id_chunk", "job_id", "chunk"),
        # What workers pull from: a job's pending items of released chunks in order, without its
        # finished ones.
        Index(
            "ix_items_pending",
            "job_id",
            "chunk",
            "index",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        # The rows leased right now, counted for /metrics without walking the queued ones.
        Index(
            "ix_items_leased",
            "lease_until",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    chunk: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str | None] = mapped_column(String(256))
    prompt: Mapped[str | None] = mapped_column(Text)
    messages: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    fields: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Per-item generation settings over the job's (OpenAI batch lines each carry their own).
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=ItemStatus.PENDING)
    output: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(Text)
    label_probs: Mapped[dict[str, float] | None] = mapped_column(JSON)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    logprobs: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    # Runs this item started; one that keeps killing its worker is failed (worker.chunk).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The lease: which worker process holds the item, and until when unless it renews.
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    job: Mapped[Job] = relationship(back_populates="items")


class File(Base):
    """An uploaded or generated file (OpenAI Files API); its bytes are in the file store
    (api.openai.filestore): FileBlock rows by default."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("file-"))
    tenant: Mapped[str] = tenant_column()
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(256))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FileBlock(Base):
    """One block of a file's contents, when the file store is the database (the default)."""

    __tablename__ = "file_blocks"

    file_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("files.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Batch(Base):
    """An OpenAI-style batch: a job underneath, with OpenAI's lifecycle on top."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("batch_"))
    tenant: Mapped[str] = tenant_column()
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    model: Mapped[str | None] = mapped_column(String(200))
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    total: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Tenant(Base):
    """Who owns jobs, files and batches; API keys are issued to a tenant."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Kept as given, not hashed: it keys the HMAC on this tenant's job webhooks.
    webhook_secret: Mapped[str | None] = mapped_column(Text)
    # Its share of each model's workers against other tenants' while they all have work waiting.
    weight: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """One API key: only its SHA-256 is stored; `id` is the key's public, non-secret part."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.name"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Worker(Base):
    """A worker process, as it last reported itself (every heartbeat): what the fleet view shows.

    A process that stops cleanly removes its row; one that dies stops reporting and drops out of
    the view once `last_seen` is a lease's length old.
    """

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # as it names its leases
    host: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(200))
    device: Mapped[str] = mapped_column(String(200))
    quantization: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    items_done: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_per_second: Mapped[float] = mapped_column(Float, default=0.0)
    # The jobs whose items it holds now (any tenant's: the API shows each caller only theirs).
    jobs: Mapped[list[str]] = mapped_column(JSON, default=list)
