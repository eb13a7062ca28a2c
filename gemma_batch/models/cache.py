"""The local cache of prepared models. Workers load only from here; the API reads sizes from it.

Nothing here imports torch or transformers: the API uses it to count prompt tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

from tokenizers import Tokenizer

from gemma_batch.errors import AppError, ModelNotPrepared
from gemma_batch.models.registry import REGISTRY

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class UnknownModel(AppError):
    status_code = 422
    code = "model_not_found"

    def __init__(self, message: str) -> None:
        super().__init__(message, "model")


def check_name(name: str) -> str:
    # Names become folder and queue names, so they must be plain.
    if not _NAME.match(name):
        raise UnknownModel(f"'{name}' is not a valid model name")
    return name


@dataclass(frozen=True)
class PreparedModel:
    name: str
    path: Path

    @cached_property
    def config(self) -> dict[str, object]:
        return json.loads((self.path / "config.json").read_text())

    @property
    def context_length(self) -> int:
        config = self.config
        text = config.get("text_config", config)
        assert isinstance(text, dict)
        return int(text.get("max_position_embeddings", 8192))

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.path / "tokenizer.json"))

    @property
    def prepared_at(self) -> int:
        """When the model was prepared here (its config written), in Unix seconds."""
        return int((self.path / "config.json").stat().st_mtime)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(texts)]


def model_path(model_dir: Path, name: str) -> Path:
    return model_dir / check_name(name)


def is_prepared(model_dir: Path, name: str) -> bool:
    return (model_path(model_dir, name) / "config.json").is_file()


def prepared_names(model_dir: Path) -> list[str]:
    if not model_dir.is_dir():
        return []
    return sorted(p.name for p in model_dir.iterdir() if (p / "config.json").is_file())


@lru_cache(maxsize=8)
def _load(path: Path, name: str) -> PreparedModel:
    return PreparedModel(name, path)


def get_prepared(model_dir: Path, name: str) -> PreparedModel:
    """The prepared model called `name`, or a clear error saying how to get it."""
    if not is_prepared(model_dir, name):
        if name in REGISTRY:
            raise ModelNotPrepared(name)
        known = ", ".join(sorted(set(REGISTRY) | set(prepared_names(model_dir))))
        raise UnknownModel(f"unknown model '{name}'; known models: {known}")
    return _load(model_path(model_dir, name).resolve(), name)
