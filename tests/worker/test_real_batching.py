"""On the real Gemma 3 270M: batching changes nothing a greedy caller can see."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import WorkItem
from worker.engine.engine import Engine
from worker.engine.loader import load_model

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The largest planet in our solar system is",
    "Once upon a time, a little fox",
    "def add(a, b):\n    return",
    "The opposite of hot is",
    "My favourite season is autumn because",
    "Photosynthesis is the process by which",
    "1, 2, 3, 4,",
    "The Eiffel Tower is located in",
    "To make a cup of tea, first",
    "The chemical symbol for gold is",
]


@pytest.mark.real_model
def test_greedy_outputs_match_one_at_a_time(real_model_dir: Path) -> None:
    model, tokenizer = load_model(real_model_dir / "gemma-3-270m", "none", "cpu")
    budgets = [4 + (i % 5) * 3 for i in range(len(PROMPTS))]
    items = [
        WorkItem(i, prompt, None, {"max_new_tokens": budget})
        for i, (prompt, budget) in enumerate(zip(PROMPTS, budgets, strict=True))
    ]
    spec = JobSpec(params=GenerationParams(max_new_tokens=max(budgets)))
    engine = Engine(model, tokenizer, batch_tokens=16384)
    together = {r.index: r for batch in engine.run(items, spec) for r in batch}
    for item, budget in zip(items, budgets, strict=True):
        alone_spec = JobSpec(params=GenerationParams(max_new_tokens=budget))
        single = [WorkItem(item.index, item.prompt, None)]
        (alone,) = [r for batch in engine.run(single, alone_spec) for r in batch]
        assert together[item.index].output == alone.output, item.prompt
        assert together[item.index].completion_tokens == alone.completion_tokens
