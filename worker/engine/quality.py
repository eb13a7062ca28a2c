"""The quality bar a quantization must pass against the unquantized model (`model check-quant`).

Three measures on one model, each run the same way for both precisions:
- perplexity on a fixed English text (gemma_batch/data/quality.txt), one forward pass;
- label accuracy on the demo's reviews, through the engine's own label mode;
- greedy agreement: 64 prompts (12-word windows of the same text), 16 tokens each through the
  worker's batcher with end tokens ignored, compared token by token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from gemma_batch.domain.params import JobSpec
from gemma_batch.domain.records import WorkItem
from worker.engine.batcher import Batcher, Row
from worker.engine.engine import Engine
from worker.engine.loader import load_model

PROMPTS, PROMPT_WORDS, NEW_TOKENS = 64, 12, 16
MAX_PERPLEXITY_CHANGE = 0.02


@dataclass(frozen=True)
class Labelling:
    """The labelling task: rows with their expected label under `answer_field`."""

    rows: Sequence[dict[str, str]]
    template: str
    prefix: str
    labels: Sequence[str]
    answer_field: str


@dataclass(frozen=True)
class Figures:
    perplexity: float
    right: int
    total: int
    greedy: list[list[int]]


@dataclass(frozen=True)
class Verdict:
    perplexity_change: float  # relative: +0.01 is 1% higher than unquantized
    identical: float  # share of prompts whose greedy tokens are all the same
    mean_prefix: float  # mean count of leading greedy tokens that agree
    passes: bool


def fixed_text() -> str:
    return files("gemma_batch").joinpath("data/quality.txt").read_text(encoding="utf-8")


def greedy_prompts(text: str) -> list[str]:
    """PROMPTS windows of PROMPT_WORDS words, spread evenly over the text."""
    words = text.split()
    step = (len(words) - PROMPT_WORDS) // (PROMPTS - 1)
    return [" ".join(words[i * step : i * step + PROMPT_WORDS]) for i in range(PROMPTS)]


@torch.inference_mode()
def perplexity(model: Any, tokenizer: Any, text: str) -> float:
    context = model.config.max_position_embeddings
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :context].to(model.device)
    return math.exp(float(model(input_ids=ids, labels=ids).loss))


def label_accuracy(engine: Engine, task: Labelling) -> int:
    """How many rows the engine's label mode gets right."""
    items = [WorkItem(i, task.template.format(**row), None) for i, row in enumerate(task.rows)]
    spec = JobSpec(prefix=task.prefix, choices=list(task.labels))
    results = [result for batch in engine.run(items, spec) for result in batch]
    return sum(r.label == task.rows[r.index][task.answer_field] for r in results)


@torch.inference_mode()
def greedy_tokens(model: Any, tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    # No stop ids: every prompt makes exactly NEW_TOKENS tokens, so all are compared.
    batcher = Batcher(model, [], 10**9, len(prompts), lambda tokens: "")
    rows = [
        Row(key=i, ids=tokenizer(p)["input_ids"], budget=NEW_TOKENS) for i, p in enumerate(prompts)
    ]
    done = batcher.admit(rows)
    while batcher.rows:
        done += batcher.step()
    return [row.tokens for row in sorted(done, key=lambda row: row.key)]


def measure(
    path: Path, quantization: str, device: str, task: Labelling, step: Callable[[str], None]
) -> Figures:
    """Load the model in `quantization` and take the three measures; `step` hears each one."""
    step(f"loading ({quantization})")
    model, tokenizer = load_model(path, quantization, device)
    text = fixed_text()
    step(f"perplexity ({quantization})")
    ppl = perplexity(model, tokenizer, text)
    step(f"labelling {len(task.rows)} rows ({quantization})")
    right = label_accuracy(Engine(model, tokenizer, batch_tokens=16384), task)
    step(f"greedy decoding, {PROMPTS} prompts x {NEW_TOKENS} tokens ({quantization})")
    greedy = greedy_tokens(model, tokenizer, greedy_prompts(text))
    return Figures(ppl, right, len(task.rows), greedy)


def judge(base: Figures, mode: Figures) -> Verdict:
    """The bar: perplexity within 2% of unquantized, and no row less labelled right."""
    change = mode.perplexity / base.perplexity - 1
    pairs = list(zip(base.greedy, mode.greedy, strict=True))
    prefixes = [_agreeing_prefix(a, b) for a, b in pairs]
    return Verdict(
        perplexity_change=change,
        identical=sum(a == b for a, b in pairs) / len(pairs),
        mean_prefix=sum(prefixes) / len(prefixes),
        passes=abs(change) <= MAX_PERPLEXITY_CHANGE and mode.right >= base.right,
    )


def _agreeing_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
