"""The records that travel between the sides: job and item states, work items, results, and the
job summary the API answers with (and the Python client reads).

`ItemResult` is the one definition of what a result holds: the worker fills it, the store writes
its fields as they are named here, and exports and OpenAI lines read the same columns.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel


class JobStatus(StrEnum):
    UPLOADING = "uploading"  # its rows are still going in: no worker or listing sees it yet
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


OPEN_JOB_STATES = (JobStatus.QUEUED, JobStatus.RUNNING)
FINISHED_JOB_STATES = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


# A job's priority: lower goes first. Sync requests jump ahead of batch work, in the broker's
# queues (kombu reads the lowest priority step first) and in the workers' slots.
INTERACTIVE_PRIORITY = 0
BATCH_PRIORITY = 6


class ItemStatus(StrEnum):
    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class WorkItem:
    """What the engine needs of one item: its text and its own settings, if it has any."""

    index: int
    prompt: str | None
    messages: list[dict[str, Any]] | None
    params: dict[str, Any] | None = None


@dataclass(frozen=True)
class ItemResult:
    """One item's answer; an `error` makes it a failed item."""

    index: int
    output: str | None = None
    label: str | None = None
    label_probs: dict[str, float] | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # Per token made, when asked for: {token, bytes, logprob, top_logprobs: [{token, bytes,
    # logprob}]} (OpenAI's chat shape; its other shapes are made from this one).
    logprobs: list[dict[str, Any]] | None = None
    error: str | None = None

    def stored(self) -> dict[str, Any]:
        """The result's columns of an item row (all but the index that finds the row)."""
        return {name: getattr(self, name) for name in RESULT_FIELDS}


# An item's result columns, in the order exports show them after id, index and status.
RESULT_FIELDS = tuple(f.name for f in fields(ItemResult) if f.name != "index")


class Counts(BaseModel):
    total: int
    completed: int
    failed: int


class WebhookState(BaseModel):
    """How a job's webhook is doing: pending until received (or given up on)."""

    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_error: str | None


class JobRead(BaseModel):
    """A job as `GET /v1/jobs/{id}` shows it, as its webhook carries it, as the client reads it."""

    id: str
    object: Literal["job"] = "job"
    model: str
    status: str
    counts: Counts
    params: dict[str, Any]
    metadata: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    webhook: WebhookState | None = None
