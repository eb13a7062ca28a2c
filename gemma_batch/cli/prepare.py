"""`gemma-batch model prepare`: put a model into the local cache before any worker needs it."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from gemma_batch.errors import AppError
from gemma_batch.models.cache import check_name, is_prepared, model_path
from gemma_batch.models.registry import PYPI_GGUF, REGISTRY
from gemma_batch.settings import Settings

log = logging.getLogger(__name__)


class PrepareError(AppError):
    pass


def prepare(source: str, settings: Settings, name: str | None = None, force: bool = False) -> Path:
    """Make `source` (a registry alias or a local model folder) loadable as `name` from the cache.

    The folder appears whole or not at all: it is built beside the cache and renamed into place.
    """
    local = Path(source).expanduser()
    is_folder = local.is_dir()
    if not is_folder and source not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise PrepareError(f"'{source}' is neither a model folder nor a known alias ({known})")
    target_name = check_name(name or (local.name if is_folder else source))
    target = model_path(settings.model_dir, target_name)
    if is_prepared(settings.model_dir, target_name) and not force:
        log.info("model %s is already prepared at %s", target_name, target)
        return target

    settings.model_dir.mkdir(parents=True, exist_ok=True)
    build: Callable[[Path], None]
    if is_folder:
        build = lambda out: shutil.copytree(local, out, dirs_exist_ok=True)  # noqa: E731
    elif REGISTRY[source].source == PYPI_GGUF:
        # Converting needs transformers, which only the worker side installs.
        from worker.engine.convert import convert_packaged_gguf

        build = convert_packaged_gguf
    else:
        build = lambda out: _download(REGISTRY[source].source, out, settings)  # noqa: E731

    with tempfile.TemporaryDirectory(dir=settings.model_dir, prefix=f".{target_name}-") as tmp:
        out = Path(tmp) / "model"
        out.mkdir()
        build(out)
        _drop_quantization_config(out)
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    log.info("prepared %s at %s", target_name, target)
    return target


def _download(repo_id: str, out: Path, settings: Settings) -> None:
    from huggingface_hub import snapshot_download

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    try:
        snapshot_download(
            repo_id,
            local_dir=out,
            token=token,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model"],
        )
    except Exception as exc:  # the hub raises many kinds; all mean the same to the user
        raise PrepareError(
            f"could not download {repo_id} from the Hugging Face Hub ({exc.__class__.__name__}: "
            f"{exc}); set GEMMA_BATCH_HF_TOKEN for gated repos, or prepare from a local folder"
        ) from exc


def _drop_quantization_config(folder: Path) -> None:
    # A leftover quantization_config (from GGUF) makes bitsandbytes refuse to quantize at load.
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2))
