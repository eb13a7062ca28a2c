"""OpenAI-compatible shapes: files, batches, and chat/text completion requests and answers."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gemma_batch.domain.json_schema import check_schema
from gemma_batch.domain.params import GenerationParams, check_stops
from gemma_batch.store.tables import Batch, File, Item, as_utc

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


def unix(moment: datetime | None) -> int | None:
    moment = as_utc(moment)
    return None if moment is None else int(moment.timestamp())


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"

    @classmethod
    def of(cls, record: File) -> FileObject:
        return cls(
            id=record.id,
            bytes=record.bytes,
            created_at=unix(record.created_at) or 0,
            filename=record.filename,
            purpose=record.purpose,
        )


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class CompletionRequest(BaseModel):
    """The body of a chat or text completion, as the `openai` client sends it."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] | None = Field(None, min_length=1)
    prompt: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(None, ge=1, le=8192)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: str | list[str] | None = Field(None, description="Up to 8 non-empty strings.")
    n: int = Field(1, ge=1, le=1, description="One answer per request.")
    stream: Literal[False] = False
    response_format: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _good_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 8 or not all(stops):
            raise ValueError("stop takes at most 8 non-empty strings")
        check_stops(stops)
        return value

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None or value.get("type") == "text":
            return None
        inner = value.get("json_schema")
        if value.get("type") != "json_schema" or not isinstance(inner, dict):
            raise ValueError("only response_format type 'text' or 'json_schema' is supported")
        schema = inner.get("schema")
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema must be a JSON Schema object")
        check_schema(schema)
        return value

    def for_endpoint(self, endpoint: str) -> CompletionRequest:
        chat = endpoint == "/v1/chat/completions"
        if chat and self.messages is None:
            raise ValueError("a chat completion needs 'messages'")
        if not chat and self.prompt is None:
            raise ValueError("a completion needs 'prompt'")
        return self

    def item_params(self) -> dict[str, Any]:
        """This request's generation settings, stored with its item."""
        params = GenerationParams(
            max_new_tokens=self.max_completion_tokens or self.max_tokens or 256,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else (self.stop or []),
        ).model_dump()
        if self.response_format is not None:
            params["json_schema"] = self.response_format["json_schema"]["schema"]
        return params

    def chat_messages(self) -> list[dict[str, str]] | None:
        if self.messages is None:
            return None
        role = {"developer": "system"}
        return [{"role": role.get(m.role, m.role), "content": m.text()} for m in self.messages]


def answer_body(item: Item, model: str, endpoint: str, created: int) -> dict[str, Any]:
    """A finished item as a chat.completion or text_completion object."""
    usage = {
        "prompt_tokens": item.prompt_tokens or 0,
        "completion_tokens": item.completion_tokens or 0,
        "total_tokens": (item.prompt_tokens or 0) + (item.completion_tokens or 0),
    }
    if endpoint == "/v1/chat/completions":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": item.output or ""},
            "finish_reason": item.finish_reason or "stop",
            "logprobs": None,
        }
        kind, prefix = "chat.completion", "chatcmpl-"
    else:
        choice = {
            "index": 0,
            "text": item.output or "",
            "finish_reason": item.finish_reason or "stop",
            "logprobs": None,
        }
        kind, prefix = "text_completion", "cmpl-"
    return {
        "id": f"{prefix}{item.job_id}-{item.index}",
        "object": kind,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(None, max_length=16)

    @model_validator(mode="after")
    def _metadata_sizes(self) -> BatchCreate:
        for key, value in (self.metadata or {}).items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError("metadata keys are at most 64 and values 512 characters")
        return self


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None
    errors: dict[str, Any] | None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: dict[str, int]
    metadata: dict[str, str] | None

    @classmethod
    def of(cls, batch: Batch, completed: int, failed: int) -> BatchObject:
        moments = {
            name: unix(getattr(batch, name))
            for name in (
                "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
                "expired_at", "cancelling_at", "cancelled_at",
            )
        }  # fmt: skip
        return cls(
            id=batch.id,
            endpoint=batch.endpoint,
            model=batch.model,
            errors={"object": "list", "data": batch.errors} if batch.errors else None,
            input_file_id=batch.input_file_id,
            completion_window=batch.completion_window,
            status=batch.status,
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            created_at=unix(batch.created_at) or 0,
            request_counts={"total": batch.total, "completed": completed, "failed": failed},
            metadata=batch.meta,
            **moments,
        )
