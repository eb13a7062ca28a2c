"""The engine on the tiny real-architecture Gemma: batching must not change what is generated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemma_batch.domain.chat import gemma_turns
from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import WorkItem
from tests.conftest import TINY
from worker.engine import decoding
from worker.engine.engine import Engine
from worker.engine.loader import load_model

PROMPTS = [
    "The capital of France is",
    "Write one word about the sea:",
    "A very long prompt " * 12,
    "Hi",
    "Once upon a time, in a land far away, there lived a",
]


@pytest.fixture(scope="module")
def fp32(model_dir: Path) -> tuple[object, object]:
    return load_model(model_dir / TINY, "none", "cpu")


def _items() -> list[WorkItem]:
    return [WorkItem(i, p, None) for i, p in enumerate(PROMPTS)]


def _run(engine: Engine, items: list[WorkItem], params: GenerationParams) -> dict[int, object]:
    return {r.index: r for batch in engine.run(items, JobSpec(params=params)) for r in batch}


def test_batched_greedy_matches_one_at_a_time(fp32: tuple[object, object]) -> None:
    params = GenerationParams(max_new_tokens=12)
    batched = _run(Engine(*fp32, batch_tokens=4096), _items(), params)
    for item in _items():
        alone = _run(Engine(*fp32, batch_tokens=4096), [item], params)[item.index]
        assert batched[item.index].output == alone.output
        assert batched[item.index].completion_tokens == alone.completion_tokens


def test_micro_batches_respect_the_token_budget(fp32: tuple[object, object]) -> None:
    engine = Engine(*fp32, batch_tokens=120)
    encoded = [engine.render(item) for item in _items()]
    for row in encoded:
        row.new_tokens = 8
    batches = list(engine.micro_batches(encoded))
    assert sum(len(b) for b in batches) == len(PROMPTS)
    assert len(batches) > 1
    for batch in batches:
        width = max(len(row.ids) for row in batch) + 8
        assert len(batch) == 1 or len(batch) * width <= 120
        lengths = [len(row.ids) for row in batch]
        assert lengths == sorted(lengths, reverse=True)


def test_results_carry_counts_and_finish_reasons(fp32: tuple[object, object]) -> None:
    engine = Engine(*fp32, batch_tokens=4096)
    results = _run(engine, _items(), GenerationParams(max_new_tokens=5))
    tokenizer = fp32[1]
    for item in _items():
        result = results[item.index]
        assert result.prompt_tokens == len(tokenizer(item.prompt)["input_ids"])
        assert result.finish_reason in ("stop", "length")
        assert 1 <= result.completion_tokens <= 5
        if result.finish_reason == "length":
            assert result.completion_tokens == 5


def test_stop_strings_cut_the_output(fp32: tuple[object, object]) -> None:
    engine = Engine(*fp32, batch_tokens=4096)
    free = _run(engine, _items(), GenerationParams(max_new_tokens=16))
    # Stop at the second character of each free output: the output is cut right before it.
    checked = 0
    for item in _items():
        text = free[item.index].output
        if len(text) < 3:
            continue
        stop = text[1:3]
        cut = _run(engine, [item], GenerationParams(max_new_tokens=16, stop=[stop]))[item.index]
        assert cut.finish_reason == "stop"
        assert cut.output == text[: text.find(stop)]
        checked += 1
    assert checked >= 3


def test_chat_messages_use_the_gemma_turn_format(fp32: tuple[object, object]) -> None:
    engine = Engine(*fp32, batch_tokens=4096)
    tokenizer = fp32[1]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
    ]
    ids = engine.render(WorkItem(0, None, messages)).ids
    text = tokenizer.decode(ids)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nName a colour.<end_of_turn>\n<start_of_turn>model\n"
    )
    assert ids.count(tokenizer.bos_token_id) == 1
    assert gemma_turns(messages) in text


def test_nf4_quantizes_the_linear_layers(model_dir: Path) -> None:
    import bitsandbytes as bnb

    model, _ = load_model(model_dir / TINY, "nf4", "cpu")
    layer = model.model.layers[0]
    for linear in (layer.self_attn.q_proj, layer.mlp.down_proj):
        assert isinstance(linear, bnb.nn.Linear4bit)
        assert linear.weight.quant_state.quant_type == "nf4"


def test_int8_quantizes_the_linear_layers(model_dir: Path) -> None:
    import bitsandbytes as bnb

    model, _ = load_model(model_dir / TINY, "int8", "cpu")
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)


def test_rows_with_their_own_budgets_share_a_batch(fp32: tuple[object, object]) -> None:
    budgets = [1, 7, 3, 12, 5]
    items = [
        WorkItem(i, p, None, {"max_new_tokens": n})
        for i, (p, n) in enumerate(zip(PROMPTS, budgets, strict=True))
    ]
    engine = Engine(*fp32, batch_tokens=4096)
    batches = list(engine.run(items, JobSpec(params=GenerationParams(max_new_tokens=12))))
    assert len(batches) == 1  # one micro-batch for all five budgets
    for result in batches[0]:
        own = GenerationParams(max_new_tokens=budgets[result.index])
        alone = _run(engine, [WorkItem(result.index, PROMPTS[result.index], None)], own)
        alone = alone[result.index]
        assert result.output == alone.output
        assert result.completion_tokens == alone.completion_tokens <= budgets[result.index]


def test_static_cache_shapes_give_the_same_tokens(fp32: tuple[object, object]) -> None:
    # The CUDA path (static cache, rows padded to a bucket) run eagerly here: the padding rows
    # and the bucketed cache must not change any real row's tokens, even with per-row budgets.
    items = [
        WorkItem(i, p, None, {"max_new_tokens": n})
        for i, (p, n) in enumerate(zip(PROMPTS, [12, 3, 7, 12, 1], strict=True))
    ]
    params = GenerationParams(max_new_tokens=12)
    plain = _run(Engine(*fp32, batch_tokens=4096), items, params)
    static = _run(Engine(*fp32, batch_tokens=4096, static=True), items, params)
    for index, result in plain.items():
        assert static[index].output == result.output
        assert static[index].completion_tokens == result.completion_tokens


def test_static_micro_batches_stop_at_the_largest_row_bucket(
    fp32: tuple[object, object],
) -> None:
    engine = Engine(*fp32, batch_tokens=10**6, static=True)
    encoded = [engine.render(WorkItem(i, "Hi", None)) for i in range(300)]
    for row in encoded:
        row.new_tokens = 4
    assert [len(b) for b in engine.micro_batches(encoded)] == [256, 44]


@pytest.mark.parametrize("static", [False, True])
def test_batched_logits_match_each_prompt_alone(fp32: tuple[object, object], static: bool) -> None:
    # A micro-batch as the engine builds it (left-padded rows of unrelated prompts, as small-job
    # merging makes them; with `static`, padded to a row bucket with a bucketed static cache)
    # must give every row the next-token logits it gets alone, at every step.
    model, tokenizer = fp32
    engine = Engine(model, tokenizer, batch_tokens=4096)
    rows = [engine.render(item).ids for item in _items()]
    greedy = {"do_sample": False, "output_logits": True, "return_dict_in_generate": True}

    def logits(batch: list[list[int]], steps: int) -> torch.Tensor:
        inputs = tokenizer.pad({"input_ids": batch}, padding=True, return_tensors="pt")
        arguments = decoding.shaped(
            inputs["input_ids"], inputs["attention_mask"], [steps] * len(batch), static, **greedy
        )
        with torch.inference_mode():
            out = model.generate(**arguments, min_new_tokens=steps)  # type: ignore[attr-defined]
        return torch.stack(out.logits, dim=1)[: len(batch)]

    together = logits(rows, 4)
    for k, row in enumerate(rows):
        alone = logits([row], 4)[0]
        assert torch.allclose(together[k], alone, atol=1e-4), (k, (together[k] - alone).abs().max())
