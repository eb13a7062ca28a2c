"""OpenAI-compatible shapes: files, batches, and chat/text completion requests and answers."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from gemma_batch.domain.json_schema import check_schema
from gemma_batch.domain.params import GenerationParams, check_stops
from gemma_batch.errors import FieldError, InvalidRequest
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


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gemma-batch"
    # A LoRA adapter's base model (null for a model): the model whose workers serve it.
    parent: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


# OpenAI parameters that change nothing here, with any value or with the values listed (clients
# send some by default). Any other parameter, or another value, is refused: never ignored.
ANY_VALUE = ("user", "metadata", "service_tier", "store", "stream_options", "parallel_tool_calls")
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logit_bias": ({},),
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
}
MAX_PROMPTS = 64  # prompts in one /v1/completions request
# What a worker's error says of a prompt past the model's context (worker/engine/engine.py).
CONTEXT_ERROR = "exceeds the model's context"


class CompletionRequest(BaseModel):
    """The body of a chat or text completion, as the `openai` client sends it."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] | None = Field(None, min_length=1)
    prompt: str | list[str] | None = Field(
        None, description=f"A prompt, or up to {MAX_PROMPTS} (text completions only)."
    )
    max_tokens: int | None = Field(None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(None, ge=1, le=8192)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: str | list[str] | None = Field(None, description="Up to 8 non-empty strings.")
    n: int = Field(1, ge=1, le=8, description="Answers per prompt.")
    stream: Literal[False] = False
    response_format: dict[str, Any] | None = None
    logprobs: bool | int | None = Field(
        None, description="Chat: true for each token's log-probability; completions: 0-5."
    )
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Chat: alternatives, 0-20.")

    @field_validator("stop")
    @classmethod
    def _good_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 8 or not all(stops):
            raise ValueError("stop takes at most 8 non-empty strings")
        check_stops(stops)
        return value

    @field_validator("prompt")
    @classmethod
    def _few_prompts(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not 0 < len(value) <= MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts")
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
        """The request, if it suits the endpoint and asks for nothing this service does not do;
        else an InvalidRequest naming the parameter."""

        def refuse(param: str, message: str) -> InvalidRequest:
            return InvalidRequest([FieldError(param, message)])

        chat = endpoint == "/v1/chat/completions"
        if chat and self.messages is None:
            raise refuse("messages", "a chat completion needs 'messages'")
        if not chat and self.prompt is None:
            raise refuse("prompt", "a completion needs 'prompt'")
        if chat and self.prompt is not None:
            raise refuse("prompt", "a chat completion takes 'messages', not 'prompt'")
        if not chat and self.messages is not None:
            raise refuse("messages", "a text completion takes 'prompt', not 'messages'")
        for name, value in (self.model_extra or {}).items():
            if value is None or name in ANY_VALUE or value in NEUTRAL_VALUES.get(name, ()):
                continue
            raise refuse(name, f"'{name}' is not supported by this service")
        if chat:
            if self.logprobs is not None and not isinstance(self.logprobs, bool):
                raise refuse("logprobs", "for chat completions, logprobs is true or false")
            if self.top_logprobs is not None and self.logprobs is not True:
                raise refuse("top_logprobs", "top_logprobs needs logprobs: true")
        else:
            if self.top_logprobs is not None:
                raise refuse(
                    "top_logprobs", "'top_logprobs' is for chat; completions take logprobs 0-5"
                )
            if self.logprobs is not None and (
                isinstance(self.logprobs, bool) or not 0 <= self.logprobs <= 5
            ):
                raise refuse("logprobs", "for completions, logprobs is a number from 0 to 5")
        return self

    def item_params(self) -> dict[str, Any]:
        """This request's generation settings, stored with its items."""
        chat_top = self.top_logprobs or 0
        wanted = self.logprobs is not None and self.logprobs is not False
        top = chat_top if isinstance(self.logprobs, bool) else int(self.logprobs or 0)
        params = GenerationParams(
            max_new_tokens=self.max_completion_tokens or self.max_tokens or 256,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else (self.stop or []),
            logprobs=wanted,
            top_logprobs=top if wanted else 0,
        ).model_dump()
        if self.response_format is not None:
            params["json_schema"] = self.response_format["json_schema"]["schema"]
        return params

    def choices(self) -> list[tuple[str | None, list[dict[str, str]] | None, dict[str, Any]]]:
        """(prompt, messages, params) of each answer asked for, in OpenAI's choice order: for
        each prompt, `n` answers (each with its own seed, when a seed is given)."""
        params = self.item_params()
        prompts: list[str | None] = (
            [None]
            if self.prompt is None
            else [self.prompt]
            if isinstance(self.prompt, str)
            else list(self.prompt)
        )
        messages = self.chat_messages()
        made = []
        for prompt in prompts:
            for number in range(self.n):
                seed = params["seed"]
                own = params | {"seed": None if seed is None else (seed + number) % 2**32}
                made.append((prompt, messages, own))
        return made

    def chat_messages(self) -> list[dict[str, str]] | None:
        if self.messages is None:
            return None
        role = {"developer": "system"}
        return [{"role": role.get(m.role, m.role), "content": m.text()} for m in self.messages]


def _chat_logprobs(item: Item) -> dict[str, Any] | None:
    return None if item.logprobs is None else {"content": item.logprobs, "refusal": None}


def _text_logprobs(item: Item) -> dict[str, Any] | None:
    if item.logprobs is None:
        return None
    tokens = [step["token"] for step in item.logprobs]
    offsets, offset = [], len(item.prompt or "")
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [step["logprob"] for step in item.logprobs],
        "top_logprobs": [
            {top["token"]: top["logprob"] for top in step["top_logprobs"]} for step in item.logprobs
        ],
        "text_offset": offsets,
    }


def answer_body(items: list[Item], model: str, endpoint: str, created: int) -> dict[str, Any]:
    """A request's finished items (one per choice) as a chat.completion or text_completion."""
    first = items[0]
    # Each prompt's tokens count once, however many answers it was given.
    prompts = {(item.prompt, str(item.messages)): item.prompt_tokens or 0 for item in items}
    completion = sum(item.completion_tokens or 0 for item in items)
    usage = {
        "prompt_tokens": sum(prompts.values()),
        "completion_tokens": completion,
        "total_tokens": sum(prompts.values()) + completion,
    }
    chat = endpoint == "/v1/chat/completions"
    choices = [
        {
            "index": index,
            "finish_reason": item.finish_reason or "stop",
            "logprobs": _chat_logprobs(item) if chat else _text_logprobs(item),
        }
        | (
            {"message": {"role": "assistant", "content": item.output or "", "refusal": None}}
            if chat
            else {"text": item.output or ""}
        )
        for index, item in enumerate(items)
    ]
    kind, prefix = ("chat.completion", "chatcmpl-") if chat else ("text_completion", "cmpl-")
    return {
        "id": f"{prefix}{first.job_id}-{first.index}",
        "object": kind,
        "created": created,
        "model": model,
        "choices": choices,
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

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI leaves out what a batch does not have yet (its schema has no nulls there).
        return {key: value for key, value in handler(self).items() if value is not None}

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
