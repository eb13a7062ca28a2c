"""Generation parameters: validated once at the HTTP edge, converted once for the engine."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gemma_batch.settings import get_settings

# Logits divided by a smaller temperature overflow to inf; so close to 0 greedy is the same answer.
MIN_TEMPERATURE = 0.01


class GenerationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(64, ge=1, le=8192)
    temperature: float = Field(
        0.0, ge=0.0, le=2.0, description="0 means greedy decoding; below 0.01 counts as 0."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1000, description="0 means no top-k cut.")
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list, max_length=8)
    logprobs: bool = Field(False, description="Return each generated token's log-probability.")
    top_logprobs: int = Field(
        0, ge=0, le=20, description="With logprobs: the most likely alternatives at each token."
    )

    @field_validator("temperature")
    @classmethod
    def _greedy_when_tiny(cls, temperature: float) -> float:
        return 0.0 if temperature < MIN_TEMPERATURE else temperature

    @field_validator("stop")
    @classmethod
    def _short_stops(cls, stops: list[str]) -> list[str]:
        return check_stops(stops)


def check_stops(stops: list[str]) -> list[str]:
    """Stop strings of at most GEMMA_BATCH_MAX_STOP_CHARS each (their count is checked apart)."""
    limit = get_settings().max_stop_chars
    for index, stop in enumerate(stops):
        if len(stop) > limit:
            raise ValueError(f"stop[{index}] is {len(stop)} characters, over the limit of {limit}")
    return stops


class JobSpec(BaseModel):
    """Everything a worker needs to know about a job besides its items."""

    params: GenerationParams = Field(default_factory=GenerationParams)
    prefix: str = ""
    chat: bool = False
    choices: list[str] | None = None
    json_schema: dict[str, Any] | None = None
    adapter: str | None = None  # a LoRA adapter of the worker's model, by its cache name
