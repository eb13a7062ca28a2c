"""What `auto` quantization picks: fp32 on CPUs, bf16 on GPUs where it fits, nf4 where it crowds."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY
from worker.engine.loader import bf16_bytes, resolve_quantization


def test_bf16_size_comes_from_the_safetensors_headers(model_dir: Path) -> None:
    tensors = {}
    for file in (model_dir / TINY).glob("*.safetensors"):
        tensors |= load_file(file)
    assert bf16_bytes(model_dir / TINY) == 2 * sum(t.numel() for t in tensors.values())


@pytest.mark.parametrize(("card_bytes", "expected"), [(10**12, "none"), (10**3, "nf4")])
def test_auto_on_cuda_keeps_bf16_unless_it_fills_half_the_card(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, card_bytes: int, expected: str
) -> None:
    # No GPU here: only the card's reported memory is stood in for.
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda _: SimpleNamespace(total_memory=card_bytes)
    )
    assert resolve_quantization("auto", "cuda", model_dir / TINY) == expected


def test_auto_on_cpu_is_full_precision_and_explicit_choices_stand(model_dir: Path) -> None:
    assert resolve_quantization("auto", "cpu", model_dir / TINY) == "none"
    assert resolve_quantization("nf4", "cpu", model_dir / TINY) == "nf4"
