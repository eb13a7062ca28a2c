"""Generation parameters: validated once at the HTTP edge, converted once for the engine."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


class GenerationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(64, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1000, description="0 means no top-k cut.")
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list, max_length=8)

    def to_generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' `generate` (stop strings are the engine's job)."""
        if self.temperature == 0.0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k or None,
        }


class JobSpec(BaseModel):
    """Everything a worker needs to know about a job besides its items."""

    params: GenerationParams = Field(default_factory=GenerationParams)
    prefix: str = ""
    chat: bool = False
    choices: list[str] | None = None
    json_schema: dict[str, Any] | None = None
