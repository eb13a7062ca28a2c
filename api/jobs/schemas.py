"""Pydantic schemas of the public API: what callers send and what they get back."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Literal, get_type_hints

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    create_model,
    field_validator,
    model_validator,
)

from api.jobs.templates import Template, TemplateError
from gemma_batch.domain.json_schema import check_schema
from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import (
    RESULT_FIELDS,
    Counts,
    ItemResult,
    JobRead,
    WebhookState,
)
from gemma_batch.settings import get_settings
from gemma_batch.store.tables import Item, Job, as_utc


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ItemIn(BaseModel):
    """One prompt: plain text for base models, or chat messages for -it models."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=256, description="The caller's id, echoed back.")
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one_input(self) -> ItemIn:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class JobOptions(BaseModel):
    """What is asked of the model for every item of a job, whatever the items came from."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="A model alias, e.g. gemma-3-270m or gemma-2b-it.")
    params: GenerationParams = Field(default_factory=GenerationParams)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=16)
    prefix: str = Field(
        "", description="Shared instruction / few-shot text put before each prompt."
    )
    chat: bool = Field(False, description="Wrap each prompt as a user turn (for -it models).")
    choices: list[str] | None = Field(
        None, description="Label mode: each item gets the most likely of these, with probabilities."
    )
    json_schema: dict[str, Any] | None = Field(
        None, description="Structured output: every output validates against this JSON Schema."
    )
    callback_url: HttpUrl | None = Field(
        None, description="Gets a POST of the signed job summary when the job is over."
    )

    @field_validator("choices")
    @classmethod
    def _good_choices(cls, choices: list[str] | None) -> list[str] | None:
        if choices is None:
            return None
        if not choices:
            raise ValueError("give at least one choice")
        settings = get_settings()
        if len(choices) > settings.max_choices:
            raise ValueError(f"{len(choices)} choices, over the limit of {settings.max_choices}")
        chars = sum(len(choice) for choice in choices)
        if chars > settings.max_choices_chars:
            raise ValueError(
                f"the choices hold {chars} characters, over the limit of "
                f"{settings.max_choices_chars}"
            )
        if any(not choice.strip() for choice in choices):
            raise ValueError("a choice may not be empty")
        repeated = sorted(choice for choice, count in Counter(choices).items() if count > 1)
        if repeated:
            raise ValueError(f"duplicate choices: {', '.join(repeated)}")
        return choices

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, metadata: dict[str, str]) -> dict[str, str]:
        size = len(json.dumps(metadata).encode())
        limit = get_settings().max_metadata_bytes
        if size > limit:
            raise ValueError(f"metadata is {size} bytes as JSON, over the limit of {limit}")
        return metadata

    @field_validator("json_schema")
    @classmethod
    def _good_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if schema is None else check_schema(schema)

    @model_validator(mode="after")
    def _one_mode(self) -> JobOptions:
        if self.choices is not None and self.json_schema is not None:
            raise ValueError("give either 'choices' or 'json_schema', not both")
        return self

    def spec(self) -> JobSpec:
        return JobSpec(
            params=self.params,
            prefix=self.prefix,
            chat=self.chat,
            choices=self.choices,
            json_schema=self.json_schema,
        )


class JobCreate(JobOptions):
    items: list[ItemIn] = Field(min_length=1)

    @field_validator("items")
    @classmethod
    def _unique_ids(cls, items: list[ItemIn]) -> list[ItemIn]:
        seen: dict[str, int] = {}
        for index, item in enumerate(items):
            if item.id is None:
                continue
            if item.id in seen:
                raise ValueError(f"items[{index}].id '{item.id}' repeats items[{seen[item.id]}].id")
            seen[item.id] = index
        return items


class FileJob(JobOptions):
    """A job whose rows come from an uploaded JSONL, CSV or Parquet file."""

    template: str = Field(description="Prompt template, e.g. 'Review: {text}\\nSentiment:'.")
    format: Literal["jsonl", "csv", "parquet"] | None = Field(
        None, description="The file's format; by default taken from its name."
    )
    id_field: str = Field("id", description="The row field that holds each row's id, if any.")

    @field_validator("template")
    @classmethod
    def _good_template(cls, template: str) -> str:
        try:
            Template(template)
        except TemplateError as exc:
            raise ValueError(str(exc)) from None
        return template


def job_read(job: Job) -> JobRead:
    """The job as callers see it."""
    return JobRead(
        id=job.id,
        model=job.adapter or job.model,
        status=job.status,
        counts=Counts(total=job.total, completed=job.completed, failed=job.failed),
        params=job.params,
        metadata=job.meta,
        created_at=as_utc(job.created_at),
        started_at=as_utc(job.started_at),
        finished_at=as_utc(job.finished_at),
        webhook=WebhookState(
            status=job.webhook_status, attempts=job.webhook_attempts, last_error=job.webhook_error
        )
        if job.webhook_status
        else None,
    )


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobRead]
    has_more: bool
    last_id: str | None


def _result_line_model() -> type[BaseModel]:
    hints = get_type_hints(ItemResult)
    own: dict[str, Any] = {name: (hints[name], None) for name in RESULT_FIELDS}
    return create_model(
        "ResultLine",
        __doc__="One line of a job's results: which item, how it ended, then its result.",
        id=(str | None, ...),
        index=(int, ...),
        status=(str, ...),
        **own,
    )


# Derived from ItemResult, so a result field is named in one place only.
ResultLine = _result_line_model()


def result_line(item: Item) -> dict[str, Any]:
    """One finished item as a line of its job's results."""
    line = {"id": item.custom_id, "index": item.index, "status": item.status}
    return line | {name: getattr(item, name) for name in RESULT_FIELDS}
