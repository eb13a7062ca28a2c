"""Out of GPU memory, fewer rows join at once: every item answered once, unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import WorkItem
from tests.conftest import TINY
from worker.engine.engine import MAX_ROWS, Engine
from worker.engine.loader import load_model


def test_batch_is_split_on_out_of_memory(model_dir: Path) -> None:
    model, tokenizer = load_model(model_dir / TINY, "none", "cpu")
    items = [WorkItem(i, f"Prompt number {i} about the sea", None) for i in range(8)]
    spec = JobSpec(params=GenerationParams(max_new_tokens=5))
    expected = {r.index: r for b in Engine(model, tokenizer, 4096).run(items, spec) for r in b}

    engine = Engine(model, tokenizer, 4096)
    real_admit = engine.batcher.admit
    rows_seen: list[int] = []

    def limited_admit(rows: list[Any]) -> list[Any]:
        # A fake allocator limit: more than 3 rows at once do not fit.
        rows_seen.append(len(rows) + len(engine.batcher.rows))
        if len(rows) + len(engine.batcher.rows) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_admit(rows)

    engine.batcher.admit = limited_admit  # type: ignore[method-assign]
    results = [r for batch in engine.run(items, spec) for r in batch]
    # 8 rows fail, 4 fail, 2 fit; from then on at most 2 rows run at once.
    assert rows_seen[:3] == [8, 4, 2]
    assert max(rows_seen[3:]) <= 2
    assert sorted(r.index for r in results) == list(range(8))
    for result in results:
        assert result.error is None
        assert result.output == expected[result.index].output
        assert result.completion_tokens == expected[result.index].completion_tokens


def test_a_lone_row_runs_when_a_full_batchs_cache_does_not_fit(
    model_dir: Path, monkeypatch: Any
) -> None:
    # The cache is sized for every row the batch may hold; where even that is too much for the
    # device, the batch shrinks to one row rather than failing the row.
    from worker.engine import batcher

    model, tokenizer = load_model(model_dir / TINY, "none", "cpu")
    item = WorkItem(0, "Prompt about the sea", None)
    spec = JobSpec(params=GenerationParams(max_new_tokens=5))
    expected = [r for b in Engine(model, tokenizer, 4096).run([item], spec) for r in b][0]
    real_cache = batcher.SlotCache
    sizes: list[int] = []

    def limited_cache(config: Any, slots: int, *args: Any) -> Any:
        sizes.append(slots)
        if slots > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_cache(config, slots, *args)

    monkeypatch.setattr(batcher, "SlotCache", limited_cache)
    engine = Engine(model, tokenizer, 4096)
    [result] = [r for b in engine.run([item], spec) for r in b]
    assert sizes == [MAX_ROWS, 1]  # a full batch of rows this narrow, then one row
    assert engine.batcher.max_rows == 1
    assert result.error is None and result.output == expected.output


def test_the_heads_own_out_of_memory_splits_the_batch_too(
    model_dir: Path, monkeypatch: Any
) -> None:
    # The head runs after the decoder (worker.engine.head): out of memory there, no row may have
    # joined the batch nor a column counted as written, and the halves then run as usual.
    from worker.engine.head import Head

    model, tokenizer = load_model(model_dir / TINY, "none", "cpu")
    items = [WorkItem(i, f"Prompt number {i} about the sea", None) for i in range(8)]
    spec = JobSpec(params=GenerationParams(max_new_tokens=5))
    expected = {r.index: r for b in Engine(model, tokenizer, 4096).run(items, spec) for r in b}

    engine = Engine(model, tokenizer, 4096)
    heads: list[int] = []

    def limited(taken: Any) -> Any:
        # A fake allocator limit on the head alone (its whole logits, or greedy picks without
        # them, whichever this processor takes): more than 3 rows do not fit.
        def head(self: Head, hidden: torch.Tensor) -> torch.Tensor:
            heads.append(len(hidden))
            if len(hidden) > 3:
                assert engine.batcher.rows == []  # no row of the group has joined
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return taken(self, hidden)

        return head

    monkeypatch.setattr(Head, "logits", limited(Head.logits))
    monkeypatch.setattr(Head, "greedy", limited(Head.greedy))
    results = [r for batch in engine.run(items, spec) for r in batch]
    assert heads[:3] == [8, 4, 2]
    assert sorted(r.index for r in results) == list(range(8))
    for result in results:
        assert result.error is None
        assert result.output == expected[result.index].output
        assert result.completion_tokens == expected[result.index].completion_tokens
