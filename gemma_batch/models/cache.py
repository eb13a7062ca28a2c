"""The local cache of prepared models. Workers load only from here; the API reads sizes from it.

A folder holds either a model (config.json, tokenizer, weights) or a LoRA adapter registered
for one (its PEFT files and ADAPTER_OF, which names the base). An adapter is served by its base
model's workers, and counts tokens with its base's tokenizer.

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

# Written into an adapter's folder by `model prepare --adapter-of`: {"base": NAME}.
ADAPTER_OF = "adapter_of.json"
# A model's weight files; a folder prepared `--tokenizer-only` (for an API) has none.
WEIGHTS = ("*.safetensors", "*.bin", "*.gguf", "*.pt")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class UnknownModel(AppError):
    # 404 as OpenAI answers it, on every route: the model (or adapter) named does not exist here.
    status_code = 404
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
    """A model, or an adapter: then `path` is its base's folder and `adapter` its own."""

    name: str
    path: Path
    base: str | None = None
    adapter: Path | None = None

    @property
    def served_by(self) -> str:
        """The model whose workers run this one's items (and whose queue they go to)."""
        return self.base or self.name

    @cached_property
    def config(self) -> dict[str, object]:
        return json.loads((self.path / "config.json").read_text())

    @property
    def context_length(self) -> int:
        config = self.config
        text = config.get("text_config", config)
        assert isinstance(text, dict)
        return int(text.get("max_position_embeddings", 8192))

    @property
    def has_weights(self) -> bool:
        """False for a model prepared `--tokenizer-only`: an API may count its tokens, but no
        worker can load it."""
        return any(any(self.path.glob(pattern)) for pattern in WEIGHTS)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.path / "tokenizer.json"))

    @property
    def prepared_at(self) -> int:
        """When the model was prepared here (its config written), in Unix seconds."""
        registered = self.adapter / ADAPTER_OF if self.adapter else self.path / "config.json"
        return int(registered.stat().st_mtime)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(texts)]


def model_path(model_dir: Path, name: str) -> Path:
    return model_dir / check_name(name)


def _is_entry(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / ADAPTER_OF).is_file()


def is_prepared(model_dir: Path, name: str) -> bool:
    return _is_entry(model_path(model_dir, name))


def prepared_names(model_dir: Path) -> list[str]:
    """Every model and adapter in the cache."""
    if not model_dir.is_dir():
        return []
    return sorted(p.name for p in model_dir.iterdir() if _is_entry(p))


def adapter_base(model_dir: Path, name: str) -> str | None:
    """The base model an adapter was registered for; None for a model."""
    registration = model_path(model_dir, name) / ADAPTER_OF
    if not registration.is_file():
        return None
    return str(json.loads(registration.read_text())["base"])


@lru_cache(maxsize=32)
def _load(
    path: Path, name: str, base: str | None = None, adapter: Path | None = None
) -> PreparedModel:
    # One instance per entry, so each tokenizer is read once.
    return PreparedModel(name, path, base, adapter)


def get_prepared(model_dir: Path, name: str) -> PreparedModel:
    """The prepared model called `name`, or a clear error saying how to get it."""
    if not is_prepared(model_dir, name):
        if name in REGISTRY:
            raise ModelNotPrepared(name)
        known = ", ".join(sorted(set(REGISTRY) | set(prepared_names(model_dir))))
        raise UnknownModel(f"unknown model '{name}'; known models: {known}")
    base = adapter_base(model_dir, name)
    if base is None:
        return _load(model_path(model_dir, name).resolve(), name)
    if not (model_path(model_dir, base) / "config.json").is_file():
        raise UnknownModel(f"adapter '{name}' needs its base model '{base}', not prepared here")
    base_path = model_path(model_dir, base).resolve()
    return _load(base_path, name, base, model_path(model_dir, name).resolve())
