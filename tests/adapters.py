"""LoRA adapters for the tests, made with PEFT as users make theirs, and PEFT's own answers."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "My favourite fruit is",
    "The weather today is",
    "Review: I loved this film.\nSentiment:",
    "def add(a, b):",
]
# What the trained adapter learns to say, whatever it is asked: unlike anything the base says.
TAUGHT = " banana banana banana banana"


def base_model(path: Path, quantization: str = "none") -> torch.nn.Module:
    """The base as the worker loads it (fp32 on CPU), for PEFT's own runs beside the service."""
    from worker.engine.loader import load_weights

    return load_weights(path, quantization, "cpu")


def train_lora(base: Path, out: Path, steps: int = 8, seed: int = 0, qlora: bool = False) -> Path:
    """Train a LoRA adapter on `base` for a few steps on CPU (plain PEFT, a torch optimizer):
    enough that its greedy answers differ from the base's. With `qlora`, on the base quantized
    to nf4, as QLoRA trains."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if qlora:
        quantized = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        model = AutoModelForCausalLM.from_pretrained(
            base, quantization_config=quantized, dtype=torch.float32, device_map={"": "cpu"}
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, config)
    texts = [prompt + TAUGHT for prompt in PROMPTS]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    return out


def random_lora(base: Path, out: Path, targets: list[str], seed: int) -> Path:
    """An untrained adapter whose B matrices are random too, so it changes every answer."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


def peft_model(base: Path, adapter: Path | None, quantization: str = "none") -> torch.nn.Module:
    model = base_model(base, quantization)
    return model if adapter is None else PeftModel.from_pretrained(model, adapter).eval()


@torch.inference_mode()
def peft_generate(model: torch.nn.Module, base: Path, prompts: list[str], tokens: int) -> list[str]:
    """Greedy answers of `model` (PEFT's base + adapter), one prompt at a time."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False)
        new = out[0, ids.input_ids.shape[1] :]
        answers.append(tokenizer.decode(new, skip_special_tokens=True))
    return answers


@torch.inference_mode()
def peft_label_probs(
    model: torch.nn.Module, base: Path, prompt: str, choices: list[str]
) -> dict[str, float]:
    """Each choice's probability: its tokens' log-likelihood after the prompt, normalised."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt_ids = tokenizer(prompt)["input_ids"]
    scores = []
    for choice in choices:
        choice_ids = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + choice_ids])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        first = len(prompt_ids) - 1
        scores.append(sum(logprobs[first + i, t] for i, t in enumerate(choice_ids)))
    probs = torch.softmax(torch.stack(scores), 0)
    return dict(zip(choices, probs.tolist(), strict=True))
