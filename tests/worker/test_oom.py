"""Out of GPU memory, a micro-batch is halved and retried: every item answered once, unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import WorkItem
from tests.conftest import TINY
from worker.engine.engine import Engine
from worker.engine.loader import load_model


def test_batch_is_split_on_out_of_memory(model_dir: Path) -> None:
    model, tokenizer = load_model(model_dir / TINY, "none", "cpu")
    items = [WorkItem(i, f"Prompt number {i} about the sea", None) for i in range(8)]
    spec = JobSpec(params=GenerationParams(max_new_tokens=5))
    expected = {r.index: r for b in Engine(model, tokenizer, 4096).run(items, spec) for r in b}

    real_generate = model.generate
    rows_seen: list[int] = []

    def limited_generate(**kwargs: Any) -> Any:
        # A fake allocator limit: more than 3 rows at once do not fit.
        rows = kwargs["input_ids"].shape[0]
        rows_seen.append(rows)
        if rows > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_generate(**kwargs)

    model.generate = limited_generate
    batches = list(Engine(model, tokenizer, 4096).run(items, spec))
    results = [r for b in batches for r in b]
    # 8 rows fail, each half of 4 fails, the quarters of 2 run.
    assert rows_seen == [8, 4, 2, 2, 4, 2, 2]
    assert sorted(r.index for r in results) == list(range(8))
    for result in results:
        assert result.error is None
        assert result.output == expected[result.index].output
        assert result.completion_tokens == expected[result.index].completion_tokens
