"""Load a prepared Gemma model with the chosen quantization onto the chosen device."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_quantization(quantization: str, device: str) -> str:
    # bitsandbytes' 4-bit kernels save GPU memory and time; on this kind of CPU they only cost
    # time (fp32 labels 1.8x faster than nf4 in bench/w2_label), so CPUs default to none.
    if quantization == "auto":
        return "nf4" if device == "cuda" else "none"
    return quantization


def _load_options(quantization: str, device: str) -> dict[str, Any]:
    # bf16 is Gemma's reference precision on GPUs; CPUs here have no fast bf16, so fp32.
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    if quantization == "nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
        return {"quantization_config": config, "dtype": compute}
    if quantization == "int8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "dtype": compute}
    return {"dtype": compute}


def load_model(path: Path, quantization: str, device: str) -> tuple[Any, Any]:
    """The model in eval mode and its tokenizer (left padding, for batched generation)."""
    device = resolve_device(device)
    quantization = resolve_quantization(quantization, device)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(
        path,
        device_map={"": device},
        attn_implementation="sdpa",
        **_load_options(quantization, device),
    )
    model.eval()
    log.info(
        "loaded model %s (%s, %s) in %.1fs",
        path.name,
        quantization,
        device,
        time.perf_counter() - started,
    )
    return model, tokenizer
