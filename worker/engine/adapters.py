"""LoRA adapters on one loaded model: rows of different adapters and of the base in one batch.

Adapters are PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors, as PEFT and
TRL save them). Each is injected into the model's own layers by PEFT's functional API and kept,
the most recently used `limit` at a time. No adapter is ever active by default: a forward pass
runs the base alone, unless `serving` names each row's adapter, which every LoRA layer then
applies to its own rows (PEFT's mixed-adapter batches: each adapter's rows as a sub-batch).
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftConfig
from peft.functional import (
    delete_adapter,
    inject_adapter_in_model,
    set_adapter,
    set_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer
from peft.utils import load_peft_weights
from transformers import AutoConfig, AutoModelForCausalLM

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT's name for "no adapter" among a batch's rows.
BASE = "__base__"


class AdapterError(Exception):
    """An adapter that cannot be applied to the model it is meant for, and why."""


def read_config(folder: Path) -> LoraConfig:
    """The folder's LoRA config; refused unless PEFT can apply it in a mixed batch."""
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / file).is_file():
            raise AdapterError(
                f"{folder} has no {file}: an adapter folder holds adapter_config.json and "
                "adapter_model.safetensors, as PEFT's save_pretrained writes them"
            )
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except Exception as exc:  # PEFT raises several kinds for a config it cannot read
        raise AdapterError(f"cannot read {folder / CONFIG_FILE}: {exc}") from exc
    if not isinstance(config, LoraConfig):
        raise AdapterError(f"{folder} is a {config.peft_type} adapter; only LoRA is served")
    if config.use_dora:
        raise AdapterError("DoRA adapters cannot share a batch with other rows; merge it instead")
    if config.modules_to_save:
        raise AdapterError(
            f"the adapter retrains whole modules ({', '.join(config.modules_to_save)}), which "
            "cannot differ row by row in one batch"
        )
    config.inference_mode = True
    return config


def check_adapter(folder: Path, base: Path) -> LoraConfig:
    """Refuse an adapter that does not fit `base`: every target module must exist there and
    every weight's shape match it. Checked on an empty (meta) copy: no weights are loaded."""
    config = read_config(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    _inject(model, config, "check", load_peft_weights(str(folder), device="cpu"), folder)
    return config


def _inject(model: Any, config: LoraConfig, name: str, weights: dict[str, Any], folder: Path):
    try:
        inject_adapter_in_model(config, model, adapter_name=name)
        loaded = set_peft_model_state_dict(model, weights, adapter_name=name)
    except (ValueError, RuntimeError, KeyError) as exc:
        # Unknown target modules (another architecture), shapes of another model size, ...
        raise AdapterError(f"{folder} does not fit this base model: {exc}") from exc
    missing = [key for key in loaded.missing_keys if f".{name}." in key]
    if loaded.unexpected_keys or missing:
        odd = (loaded.unexpected_keys or missing)[:3]
        raise AdapterError(f"{folder}'s weights do not match its config or this base: {odd}")


class Adapters:
    """The adapters loaded into `model`, at most `limit`; the least recently used goes first."""

    def __init__(self, model: Any, limit: int) -> None:
        self.model, self.limit = model, limit
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._layers: list[LoraLayer] = []
        self._names: list[str] | None = None  # each row's adapter in the forward pass running

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def touch(self, name: str) -> bool:
        """Mark `name` as just used; False if it is not loaded."""
        if name not in self._loaded:
            return False
        self._loaded.move_to_end(name)
        return True

    def load(self, name: str, folder: Path, in_use: Collection[str] = ()) -> None:
        """Make `name` ready to serve (a no-op once loaded), evicting the least recently used
        adapter that no running row is using if more than `limit` would be kept."""
        if self.touch(name):
            return
        config = read_config(folder)
        weights = load_peft_weights(str(folder), device=str(self.model.device))
        with warnings.catch_warnings():
            # PEFT warns whenever a second adapter joins a model: here that is the point.
            warnings.filterwarnings("ignore", "Already found a `peft_config`")
            _inject(self.model, config, name, weights, folder)
        dtype = next(self.model.parameters()).dtype
        layers = [module for module in self.model.modules() if isinstance(module, LoraLayer)]
        hooked = {id(layer) for layer in self._layers}
        for layer in layers:
            if name in layer.lora_A:  # the adapter's weights in the model's compute precision
                layer.lora_A[name].to(dtype)
                layer.lora_B[name].to(dtype)
            if id(layer) not in hooked:
                layer.register_forward_pre_hook(self._route, with_kwargs=True)
        self._layers = layers
        # Injecting makes the new adapter active for every row; rows name theirs instead.
        set_adapter(self.model, [], inference_mode=True)
        self._loaded[name] = None
        log.info("loaded adapter %s from %s", name, folder)
        spare = [kept for kept in self._loaded if kept not in in_use and kept != name]
        while len(self._loaded) > self.limit and spare:
            self._evict(spare.pop(0))

    def _evict(self, name: str) -> None:
        delete_adapter(self.model, name, prefix="lora_", layer_cls=LoraLayer)
        self.model.peft_config.pop(name, None)
        set_adapter(self.model, [], inference_mode=True)
        del self._loaded[name]
        log.info("unloaded adapter %s (more than %s were loaded)", name, self.limit)

    @contextmanager
    def serving(self, adapters: Sequence[str | None]) -> Iterator[None]:
        """Forward passes inside run row i with adapter `adapters[i]` (None: the base)."""
        named = set(adapters)
        if named == {None}:
            yield
            return
        if len(named) == 1:
            # One adapter for every row (a job's label batch, say): PEFT's plain path, without
            # the per-layer gathering and scattering of sub-batches a mix needs.
            (only,) = named
            for layer in self._layers:
                layer.set_adapter([only], inference_mode=True)
            try:
                yield
            finally:
                for layer in self._layers:
                    layer.set_adapter([], inference_mode=True)
            return
        self._names = [name or BASE for name in adapters]
        try:
            yield
        finally:
            self._names = None

    def _route(self, module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, Any]:
        if self._names is not None:
            kwargs["adapter_names"] = self._names
        return args, kwargs
