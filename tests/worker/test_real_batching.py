"""On the real Gemma 3 270M: batching changes nothing a greedy caller can see."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import ItemResult, WorkItem
from worker.engine.engine import Engine
from worker.engine.head import Head
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


FEWSHOT = (
    "Complete each line with a few plain words.\n"
    "Line: The colour of the sky is\nAnswer: blue on a clear day.\n"
    "Line: "
)


@pytest.mark.real_model
def test_greedy_outputs_match_one_at_a_time(
    real_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 24 rows: the prompts alone, and again behind a shared few-shot prefix (computed once and
    # copied into each row's slot); mixed budgets. With eight slots rows join mid-flight; with
    # sixteen, steps of more than eight rows take their greedy picks block by block
    # (worker.engine.head), fewer rows from the whole logits; on a processor that multiplies
    # bf16 natively, every step takes them through the head's bf16 screen instead. Then sixteen
    # slots again with eight decode steps a read, as on a GPU (worker.engine.batcher's windows).
    model, tokenizer = load_model(real_model_dir / "gemma-3-270m", "none", "cpu")
    screened = getattr(model.get_output_embeddings(), "screen", None) is not None
    specs = [JobSpec(), JobSpec(prefix=FEWSHOT)]
    work = [
        (spec, WorkItem(i, prompt, None, {"max_new_tokens": 3 + (i * 7 + k) % 14}))
        for k, spec in enumerate(specs)
        for i, prompt in enumerate(PROMPTS)
    ]
    together: dict[tuple[int, int], dict[int, ItemResult]] = {}
    greedy = Head.greedy
    picked: list[int] = []  # the rows of each step whose picks came without the whole logits
    monkeypatch.setattr(
        Head, "greedy", lambda head, hidden: picked.append(len(hidden)) or greedy(head, hidden)
    )
    for slots, window in ((8, 1), (16, 1), (16, 8)):
        engine = Engine(model, tokenizer, batch_tokens=16384)
        engine.batcher.max_rows, engine.batcher.steps_per_read = slots, window
        waiting = [engine.prepare(item, spec, owner=n) for n, (spec, item) in enumerate(work)]
        assert all(row.prefix for row in waiting[len(PROMPTS) :])  # the prefix is shared
        results: dict[int, ItemResult] = {}
        while waiting or engine.batcher.rows:
            group = []
            while waiting and engine.batcher.fits(waiting[0], group):
                group.append(waiting.pop(0))
            ended = engine.admit(group)[0] if group else []
            ended += engine.step() if engine.batcher.rows else []
            results |= {row.key.owner: engine.result(row) for row in ended}
        assert len(results) == 24
        together[slots, window] = results
        assert max(picked, default=0) == (16 if slots == 16 else 8 if screened else 0)
    for n, (spec, item) in enumerate(work):
        # Alone, and without prefix sharing: the whole prompt computed as one text.
        whole = WorkItem(item.index, spec.prefix + (item.prompt or ""), None)
        own = JobSpec(params=GenerationParams(max_new_tokens=item.params["max_new_tokens"]))
        (alone,) = [r for batch in Engine(model, tokenizer, 16384).run([whole], own) for r in batch]
        for results in together.values():
            assert results[n].output == alone.output, (n, item.prompt)
            assert results[n].completion_tokens == alone.completion_tokens
