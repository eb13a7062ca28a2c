"""Load a prepared Gemma model with the chosen quantization onto the chosen device."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TorchAoConfig

from worker.engine.head import add_screen
from worker.engine.products import turn_few_row_products
from worker.quantization import TORCHAO_KERNELS, check_mode

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def gpu_memory_bytes() -> int | None:
    """GPU memory torch holds in this process; None without CUDA."""
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else None


def bf16_bytes(path: Path) -> int:
    """Size of a prepared model's weights in bf16, read from the safetensors headers alone."""
    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as weights:
            total += sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())  # noqa: SIM118
    return total * 2


def resolve_quantization(quantization: str, device: str, path: Path) -> str:
    """What `auto` means for this model on this device (docs/benchmarks.md has the figures).

    `auto` is the fastest mode that passes `model check-quant`'s bar (perplexity within 2%,
    label accuracy kept). On CPUs that is fp32 (bf16 aside, below): on the 270M, int8-wo passes
    but is not reliably faster (0.8-1.2x fp32 across runs: the tied 262k-row vocabulary head,
    most of the weights, stays fp32), int8 passes and labels 1.3x faster but decodes no faster
    (and bitsandbytes was slower than fp32 on the earlier Intel CPU), and nf4 is faster but
    fails the bar (+26% perplexity). `bf16` on a CPU with AMX (Intel Xeon from Sapphire Rapids
    on) passes the bar (+0.04% perplexity) and made W1 2.2x as fast as fp32, but it is not
    `auto` there: its matmul kernels round a row differently with the number of rows beside it,
    so greedy output batched no longer always equals the output alone (17 of 24 prompts
    identical on the 270M), a promise fp32 keeps; and it is measured only on a CPU with AMX. On
    CUDA no torchao mode is measured yet (bench/gpu has the runs; no GPU was lent), so the rule
    stands from the H200 figures: bf16 made 5.9x the tokens/s of nf4 at batch 64, and nf4 is
    kept for cards where the bf16 weights would take over half the memory, leaving too little
    for the KV cache.
    """
    if quantization != "auto":
        return quantization
    if device != "cuda":
        return "none"
    room = torch.cuda.get_device_properties(0).total_memory / 2
    return "none" if bf16_bytes(path) <= room else "nf4"


def check_supported(quantization: str, device: str) -> None:
    """Refuse, naming the mode and the device, a torchao mode this device cannot run."""
    card = None
    if device != "cpu" and torch.cuda.is_available():
        card = (torch.cuda.get_device_name(), torch.cuda.get_device_capability())
    check_mode(quantization, device, card)


def _torchao_config(quantization: str) -> TorchAoConfig:
    # Only its own modes need torchao: a worker without it still loads every other mode.
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    if quantization == "int8-wo":
        return TorchAoConfig(Int8WeightOnlyConfig())
    if quantization == "int4-wo":
        # tile_packed_to_4d is tinygemm's layout; the default (plain) needs the mslk package.
        return TorchAoConfig(
            Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
        )
    return TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


def _load_options(quantization: str, device: str) -> dict[str, Any]:
    # bf16 is Gemma's reference precision on GPUs; on CPUs fp32 unless bf16 is asked for (see
    # resolve_quantization).
    compute = torch.bfloat16 if device == "cuda" or quantization == "bf16" else torch.float32
    if quantization == "nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
        return {"quantization_config": config, "dtype": compute}
    if quantization == "int8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "dtype": compute}
    if quantization in TORCHAO_KERNELS:
        return {"quantization_config": _torchao_config(quantization), "dtype": compute}
    return {"dtype": compute}


def load_weights(path: Path, quantization: str, device: str) -> Any:
    """The model alone, in eval mode (the GPU benchmark has weights but no tokenizer)."""
    device = resolve_device(device)
    quantization = resolve_quantization(quantization, device, path)
    check_supported(quantization, device)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        device_map={"": device},
        attn_implementation="sdpa",
        **_load_options(quantization, device),
    )
    model.eval()
    if device == "cpu" and quantization == "none":
        turn_few_row_products(model)
        add_screen(model)
    log.info(
        "loaded model %s (%s, %s) in %.1fs",
        path.name,
        quantization,
        device,
        time.perf_counter() - started,
    )
    return model


def load_model(path: Path, quantization: str, device: str) -> tuple[Any, Any]:
    """The model and its tokenizer (left padding, for batched generation)."""
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    return load_weights(path, quantization, device), tokenizer
