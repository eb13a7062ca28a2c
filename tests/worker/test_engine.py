"""The engine on the tiny real-architecture Gemma: batching must not change what is generated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from gemma_batch.domain.chat import gemma_turns
from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import WorkItem
from tests.conftest import TINY
from worker.engine.batcher import STEPS_PER_READ, Batcher, Row, Sampling, prefill_passes
from worker.engine.engine import Engine
from worker.engine.head import (
    BLOCK,
    MOST_CANDIDATES,
    Head,
    Screen,
    add_screen,
    bf16_dot_products,
)
from worker.engine.loader import load_model
from worker.engine.products import HEAD_ROWS, LAYER_ROWS, FewRowsLinear

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


@pytest.fixture(params=["screened", "blocks"])
def greedy_path(request: pytest.FixtureRequest, fp32: tuple[object, object]) -> Iterator[str]:
    """The tiny model's greedy picks through a bf16 screen, or block by block, whatever this
    processor would choose (worker.engine.head), restored after."""
    layer = fp32[0].get_output_embeddings()  # type: ignore[attr-defined]
    own = getattr(layer, "screen", None)
    layer.screen = Screen.of(layer.weight) if request.param == "screened" else None
    yield request.param
    layer.screen = own


def _items() -> list[WorkItem]:
    return [WorkItem(i, p, None) for i, p in enumerate(PROMPTS)]


def _run(engine: Engine, items: list[WorkItem], params: GenerationParams) -> dict[int, object]:
    return {r.index: r for batch in engine.run(items, JobSpec(params=params)) for r in batch}


def test_batched_greedy_matches_one_at_a_time(
    fp32: tuple[object, object], greedy_path: str
) -> None:
    params = GenerationParams(max_new_tokens=12)
    batched = _run(Engine(*fp32, batch_tokens=4096), _items(), params)
    for item in _items():
        alone = _run(Engine(*fp32, batch_tokens=4096), [item], params)[item.index]
        assert batched[item.index].output == alone.output
        assert batched[item.index].completion_tokens == alone.completion_tokens


def test_running_rows_respect_the_token_budget(fp32: tuple[object, object]) -> None:
    engine = Engine(*fp32, batch_tokens=120)
    seen: list[tuple[int, int]] = []
    step = engine.batcher.step

    def watched() -> list[object]:
        rows = engine.batcher.rows
        seen.append((len(rows), max(row.length for row in rows)))
        return step()

    engine.batcher.step = watched  # type: ignore[method-assign]
    results = _run(engine, _items(), GenerationParams(max_new_tokens=8))
    assert sorted(results) == list(range(len(PROMPTS)))
    assert max(rows for rows, _ in seen) > 1
    for rows, widest in seen:
        assert rows == 1 or rows * widest <= 120


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


def test_bf16_runs_in_bf16_on_a_cpu(model_dir: Path, fp32: tuple[object, object]) -> None:
    model, tokenizer = load_model(model_dir / TINY, "bf16", "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    engine = Engine(model, tokenizer, batch_tokens=4096)
    engine.stop_ids, engine.batcher.stop_ids = [], set()  # bf16 rounding may pick an end early
    [result] = _run(engine, _items()[:1], GenerationParams(max_new_tokens=6)).values()
    assert result.completion_tokens == 6
    # `none` stays fp32 on a CPU.
    assert {p.dtype for p in fp32[0].parameters()} == {torch.float32}  # type: ignore[attr-defined]


def test_rows_with_their_own_budgets_share_a_batch(fp32: tuple[object, object]) -> None:
    budgets = [1, 7, 3, 12, 5]
    items = [
        WorkItem(i, p, None, {"max_new_tokens": n})
        for i, (p, n) in enumerate(zip(PROMPTS, budgets, strict=True))
    ]
    engine = Engine(*fp32, batch_tokens=4096)
    admitted: list[int] = []
    admit = engine.batcher.admit

    def watched(rows: list[object]) -> list[object]:
        admitted.append(len(rows))
        return admit(rows)  # type: ignore[arg-type]

    engine.batcher.admit = watched  # type: ignore[method-assign]
    results = _run(engine, items, GenerationParams(max_new_tokens=12))
    assert admitted == [5]  # all five budgets joined one batch
    for index, result in results.items():
        own = GenerationParams(max_new_tokens=budgets[index])
        alone = _run(Engine(*fp32, batch_tokens=4096), [WorkItem(index, PROMPTS[index], None)], own)
        assert result.output == alone[index].output
        assert result.completion_tokens == alone[index].completion_tokens <= budgets[index]


def test_a_finished_rows_slot_is_taken_before_the_longest_row_ends(
    fp32: tuple[object, object],
) -> None:
    # Three slots, budgets 16, 2, 2, 2, 2: padded batches of three would decode 15 + 1 steps;
    # continuous batching refills the short rows' slots while the long row goes on.
    model, tokenizer = fp32
    engine = Engine(model, tokenizer, batch_tokens=4096)
    engine.batcher.max_rows = 3
    budgets = [16, 2, 2, 2, 2]
    items = [
        WorkItem(i, f"Prompt {i} about the sea", None, {"max_new_tokens": n})
        for i, n in enumerate(budgets)
    ]
    steps = 0
    step = engine.batcher.step

    def counted() -> list[object]:
        nonlocal steps
        steps += 1
        return step()

    engine.batcher.step = counted  # type: ignore[method-assign]
    spec = JobSpec(params=GenerationParams(max_new_tokens=16))
    finished = [r.index for batch in engine.run(items, spec) for r in batch]
    assert steps == 15  # the long row's steps alone: the others ran beside it
    assert finished[-1] == 0 and sorted(finished) == list(range(5))


def test_seeded_sampling_is_the_same_batched_or_alone(fp32: tuple[object, object]) -> None:
    params = GenerationParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    batched = _run(Engine(*fp32, batch_tokens=4096), _items(), params)
    for item in _items():
        alone = _run(Engine(*fp32, batch_tokens=4096), [item], params)[item.index]
        assert batched[item.index].output == alone.output
    outputs = {result.output for result in batched.values()}
    other = _run(Engine(*fp32, batch_tokens=4096), _items(), params.model_copy(update={"seed": 8}))
    assert [other[i].output for i in range(len(PROMPTS))] != [
        batched[i].output for i in range(len(PROMPTS))
    ]
    assert len(outputs) > 1


def test_greedy_sampled_and_logprob_rows_in_one_batch_each_get_their_own_output(
    fp32: tuple[object, object], greedy_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 18 rows in one batch: 10 greedy (their picks taken block by block, past HEAD_ROWS), 6
    # sampled with seeds and 2 greedy with log-probabilities (both from their whole logits).
    # Splitting a step's rows between the two must give each row what it makes alone.
    def params(i: int) -> dict[str, object]:
        if i % 3 == 2:
            return {"max_new_tokens": 8, "temperature": 1.0, "seed": 100 + i}
        if i in (4, 9):
            return {"max_new_tokens": 8, "logprobs": True, "top_logprobs": 2}
        return {"max_new_tokens": 8}

    items = [WorkItem(i, PROMPTS[i % len(PROMPTS)], None, params(i)) for i in range(18)]
    greedy_rows: list[int] = []
    greedy = Head.greedy
    monkeypatch.setattr(
        Head, "greedy", lambda head, hidden: greedy_rows.append(len(hidden)) or greedy(head, hidden)
    )
    together = {
        r.index: r
        for batch in Engine(*fp32, batch_tokens=4096).run(items, JobSpec())
        for r in batch
    }
    assert max(greedy_rows) == 10 > HEAD_ROWS
    for item in items:
        (alone,) = [
            r for batch in Engine(*fp32, batch_tokens=4096).run([item], JobSpec()) for r in batch
        ]
        assert together[item.index].output == alone.output, item.index
        assert together[item.index].completion_tokens == alone.completion_tokens
        if item.index in (4, 9):
            assert together[item.index].logprobs is not None
            assert [e["token"] for e in together[item.index].logprobs] == [
                e["token"] for e in alone.logprobs
            ]


def test_batched_logits_match_each_prompt_alone(fp32: tuple[object, object]) -> None:
    # Rows of unrelated prompts joining the batch at different steps (two slots for five rows)
    # must get the next-token logits each gets alone, at every step.
    model, tokenizer = fp32

    def logits_by_row(items: list[WorkItem], slots: int) -> dict[int, list[torch.Tensor]]:
        engine = Engine(model, tokenizer, batch_tokens=4096)
        engine.batcher.max_rows = slots
        seen: dict[int, list[torch.Tensor]] = {}
        pick = engine.batcher._pick

        def watched(rows: list[object], hidden: torch.Tensor) -> list[int]:
            logits = engine.batcher.head.logits(hidden)
            for row, row_logits in zip(rows, logits, strict=True):
                seen.setdefault(row.key.encoded.item.index, []).append(row_logits.clone())
            return pick(rows, hidden)  # type: ignore[arg-type]

        engine.batcher._pick = watched  # type: ignore[method-assign]
        list(engine.run(items, JobSpec(params=GenerationParams(max_new_tokens=4))))
        return seen

    together = logits_by_row(_items(), slots=2)
    for item in _items():
        alone = logits_by_row([item], slots=1)[item.index]
        assert len(alone) == len(together[item.index]) == 4
        for step, (a, b) in enumerate(zip(together[item.index], alone, strict=True)):
            assert torch.allclose(a, b, atol=1e-4), (item.index, step, (a - b).abs().max())


@pytest.mark.parametrize("rows", [1, LAYER_ROWS, LAYER_ROWS + 1, HEAD_ROWS, HEAD_ROWS + 1])
def test_products_of_few_rows_are_turned_round_with_the_same_values(
    fp32: tuple[object, object], rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loader turns few rows' products round (worker.engine.products): same values as
    # torch's own product, for the head and for a layer, with and without a bias, for a decode
    # step's shape (rows, 1, width) and a prefill pass's (1, rows, width).
    model: Any = fp32[0]
    head, layer = model.lm_head, model.model.layers[0].mlp.up_proj
    biased = torch.nn.Linear(layer.in_features, layer.out_features)
    biased.__class__ = FewRowsLinear
    assert type(head) is type(layer) is FewRowsLinear
    assert (head.most_rows, layer.most_rows) == (HEAD_ROWS, LAYER_ROWS)
    assert head.weight is model.get_input_embeddings().weight
    own = torch.nn.functional.linear
    calls: list[int] = []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *args: calls.append(1) or own(*args))
    generator = torch.Generator().manual_seed(rows)
    for linear in (head, layer, biased):
        for shape in ((rows, 1, linear.in_features), (1, rows, linear.in_features)):
            x = torch.randn(shape, generator=generator)
            calls.clear()
            with torch.inference_mode():
                got = linear(x)
                expected = own(x, linear.weight, linear.bias)
            assert len(calls) == (rows > linear.most_rows)  # torch's product only past the bound
            assert got.shape == expected.shape == (*shape[:-1], linear.out_features)
            assert got.is_contiguous()
            assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("cap", [None, 0.5])
def test_greedy_picks_block_by_block_are_the_whole_rows_picks(
    cap: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A head of three blocks and a bit, with a weight row repeated two blocks later: the first of
    # equal maxima must win across blocks, as `max` over the whole row keeps it; another row's
    # maximum lies in the last, partial block. With a soft cap of 0.5, tanh makes every large
    # logit the same, so ties are everywhere.
    width, vocab = 16, 3 * BLOCK + 100
    generator = torch.Generator().manual_seed(5)
    layer = torch.nn.Linear(width, vocab, bias=False)
    layer.__class__ = FewRowsLinear
    layer.most_rows = HEAD_ROWS
    with torch.no_grad():
        layer.weight.copy_(torch.randn(vocab, width, generator=generator))
        layer.weight[11] *= 5  # far longer than the others: its own row's maximum
        layer.weight[2 * BLOCK + 7] = layer.weight[11]
        layer.weight[vocab - 3] *= 5
    config = SimpleNamespace(final_logit_softcapping=cap)
    head = Head(SimpleNamespace(config=config, get_output_embeddings=lambda: layer))
    hidden = torch.randn(40, width, generator=generator)
    hidden[3] = layer.weight[11].detach()  # row 3's maximum is the repeated weight row
    hidden[5] = layer.weight[vocab - 3].detach()  # row 5's is in the last block
    assert [head.picks(rows) for rows in (1, HEAD_ROWS, HEAD_ROWS + 1)] == [False, False, True]
    with torch.inference_mode():
        whole = head.logits(hidden)
        expected = whole.max(dim=-1).indices
        if cap is None:
            assert expected[3] == 11 and whole[3, 11] == whole[3, 2 * BLOCK + 7]
            assert expected[5] == vocab - 3
        else:  # the cap makes ties of many large logits; the first of them is the pick
            assert (whole == whole.max(dim=-1, keepdim=True).values).sum(dim=-1).min() > 1
        # Block by block, without the whole logits.
        monkeypatch.setattr(Head, "logits", lambda *_: pytest.fail("the whole logits were made"))
        for rows in (1, HEAD_ROWS + 1, 40):
            assert torch.equal(head.greedy(hidden[:rows]), expected[:rows])


def test_screened_greedy_picks_are_the_exact_maxima(monkeypatch: pytest.MonkeyPatch) -> None:
    # Through a bf16 screen, each row's pick must be its exact maximum (the first of equal
    # maxima), even where two tokens differ by far less than bf16 can tell apart; a row with a
    # NaN, and a row of zeros (every token a candidate), take the whole logits' pick instead.
    width, vocab = 16, 3 * BLOCK + 100
    generator = torch.Generator().manual_seed(7)
    layer = torch.nn.Linear(width, vocab, bias=False)
    layer.__class__ = FewRowsLinear
    layer.most_rows = HEAD_ROWS
    hidden = torch.randn(40, width, generator=generator)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(vocab, width, generator=generator) * 0.3)
        pairs = [(100, 3 * BLOCK + 50, 1e-3), (7, BLOCK + 9, -1e-3)]
        for row, (near, far, step) in enumerate(pairs):
            # Both far the largest for this row, `far` ahead by `step` (1e-4 of the logit), and
            # also apart across the row (so that bf16 rounds them differently).
            direction = hidden[row] / hidden[row].norm()
            across = 4 * torch.randn(width, generator=torch.Generator().manual_seed(122))
            across -= (across @ direction) * direction
            layer.weight[near] = 3 * direction
            layer.weight[far] = 3 * direction + across + step * direction / hidden[row].norm()
        layer.weight[2 * BLOCK + 3] = layer.weight[55] = 3 * hidden[2] / hidden[2].norm()
    hidden[3, 4] = torch.nan
    hidden[4] = 0
    assert vocab > MOST_CANDIDATES  # so that the row of zeros has too many candidates
    layer.screen = Screen.of(layer.weight)
    head = Head(SimpleNamespace(config=SimpleNamespace(), get_output_embeddings=lambda: layer))
    assert head.picks(1)
    with torch.inference_mode():
        # The bf16 product alone would pick row 0's other token: only the bound finds this one.
        rough = hidden[:1].bfloat16() @ layer.screen.weight.T
        assert rough[0, 3 * BLOCK + 50] < rough[0, 100] == rough[0].max()
        exact = (hidden.double() @ layer.weight.double().T).max(dim=-1).indices
        whole = head.logits(hidden).max(dim=-1).indices
        logits = head.logits
        asked: list[int] = []
        monkeypatch.setattr(Head, "logits", lambda h, x: asked.append(len(x)) or logits(x))
        picks = head.greedy(hidden)
        assert asked == [2]  # only the NaN row and the row of zeros
        assert picks[0] == 3 * BLOCK + 50 and picks[1] == 7 and picks[2] == 55
        assert picks[3] == whole[3] and picks[4] == whole[4] == 0
        assert torch.equal(picks[5:], exact[5:])
        assert torch.equal(picks[:3], exact[:3])
        for rows in (1, 2, 9):  # alone and in fewer rows: the same picks
            assert torch.equal(head.greedy(hidden[5 : 5 + rows]), exact[5 : 5 + rows])


def test_a_screen_is_added_only_to_an_uncapped_fp32_cpu_head_on_bf16_hardware(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def model(kind: type, cap: float | None) -> SimpleNamespace:
        layer = torch.nn.Linear(8, 32, bias=False)
        layer.__class__ = kind
        config = SimpleNamespace(final_logit_softcapping=cap)
        return SimpleNamespace(config=config, get_output_embeddings=lambda: layer)

    def screened(native: bool, kind: type, cap: float | None) -> bool:
        monkeypatch.setattr("worker.engine.head.bf16_dot_products", lambda native=native: native)
        made = model(kind, cap)
        add_screen(made)
        return getattr(made.get_output_embeddings(), "screen", None) is not None

    assert screened(True, FewRowsLinear, None)
    assert not screened(False, FewRowsLinear, None)
    assert not screened(True, FewRowsLinear, 30.0)
    assert not screened(True, torch.nn.Linear, None)  # a quantized or bf16 head keeps its own
    made = model(FewRowsLinear, None)
    monkeypatch.setattr("worker.engine.head.bf16_dot_products", lambda: True)
    add_screen(made)
    layer = made.get_output_embeddings()
    assert layer.screen.weight.dtype == torch.bfloat16
    assert torch.equal(layer.screen.weight.float(), layer.weight.detach().bfloat16().float())
    assert layer.screen.widest == pytest.approx(layer.weight.detach().norm(dim=1).max().item())


def test_the_loader_screens_the_head_only_where_bf16_is_native(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for native in (True, False):
        monkeypatch.setattr("worker.engine.head.bf16_dot_products", lambda native=native: native)
        model, _ = load_model(model_dir / TINY, "none", "cpu")
        screen = getattr(model.get_output_embeddings(), "screen", None)
        assert (screen is not None) is native
    assert screen is None
    monkeypatch.setattr("worker.engine.head.bf16_dot_products", lambda: True)
    model, _ = load_model(model_dir / TINY, "bf16", "cpu")  # a bf16 head needs none
    assert getattr(model.get_output_embeddings(), "screen", None) is None


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ({"avx512_bf16": True, "avx512_f": True}, True),
        ({"amx_bf16": True, "amx_tile": True}, True),
        ({"avx512_f": True, "avx2": True, "avx512_bf16": False}, False),
        ({"architecture": "aarch64"}, False),
    ],
)
def test_bf16_is_native_with_avx512_bf16_or_amx(
    flags: dict[str, object], native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
    assert bf16_dot_products() is native


def test_prefill_passes_cost_least_of_every_split() -> None:
    # Against every way of cutting rows (longest first) into passes, for small random batches,
    # with and without a bound on a pass's padded tokens.
    import itertools
    import math
    import random

    def cost(lengths: list[int], ends: list[int], per_pass: int, most: int | None) -> float:
        begins = [0, *ends[:-1]]
        sizes = [(e - b, lengths[b]) for b, e in zip(begins, ends, strict=True)]
        if most is not None and any(rows > 1 and rows * width > most for rows, width in sizes):
            return math.inf
        return sum(rows * width + per_pass for rows, width in sizes)

    generator = random.Random(3)
    for _ in range(80):
        lengths = sorted(generator.randint(1, 80) for _ in range(generator.randint(1, 9)))[::-1]
        per_pass = generator.choice([0, 8, 32, 1024])
        most = generator.choice([None, 40, 100, 300])
        count = len(lengths)
        least = min(
            cost(lengths, [*cuts, count], per_pass, most)
            for size in range(count)
            for cuts in itertools.combinations(range(1, count), size)
        )
        found = prefill_passes(lengths, per_pass, most)
        assert cost(lengths, found, per_pass, most) == least
    # Two lengths far apart go in two passes; a pass's cost above the padding saved joins them.
    assert prefill_passes([60, 58, 12, 10], 32) == [2, 4]
    assert prefill_passes([60, 58, 12, 10], 100) == [4]
    # However dear a pass, none holds over `most` padded tokens unless it is one row.
    assert prefill_passes([60, 58, 12, 10], 100, most=100) == [1, 2, 4]


def test_prompts_of_different_lengths_prefill_in_passes(fp32: tuple[object, object]) -> None:
    engine = Engine(*fp32, batch_tokens=4096)
    passes: list[tuple[int, int]] = []
    prefill = engine.batcher._prefill

    def watched(rows: list[Row], first: int) -> torch.Tensor:
        passes.append((len(rows), max(len(row.ids) for row in rows)))
        return prefill(rows, first)

    engine.batcher._prefill = watched  # type: ignore[method-assign]
    _run(engine, _items(), GenerationParams(max_new_tokens=4))
    longest = max(len(engine.render(item).ids) for item in _items())
    assert len(passes) == 2 and passes[0] == (1, longest)  # the long prompt by itself
    assert sum(rows * span for rows, span in passes) < len(PROMPTS) * longest


def _row(engine: Engine, prompt: str, budget: int) -> Row:
    row = engine.prepare(WorkItem(0, prompt, None), JobSpec(params=GenerationParams()))
    assert isinstance(row, Row)
    row.budget = budget
    return row


def test_rows_joining_in_waves_keep_one_cache(fp32: tuple[object, object]) -> None:
    # Allocating and zeroing every layer's buffer again for each wave of rows cost a worker 16%
    # of its time: the first wave takes the slots the batch may hold at its width.
    engine = Engine(*fp32, batch_tokens=1024)
    batcher = engine.batcher
    batcher.admit([_row(engine, "The sea is", 8), _row(engine, "A cat", 8)])
    cache = batcher.cache
    assert cache is not None
    widest = max(row.length for row in batcher.rows)
    assert cache.slots == 1024 // widest < batcher.max_rows
    batcher.admit([_row(engine, f"Wave two, row {i}", 8) for i in range(3)])
    batcher.step()
    batcher.admit([_row(engine, f"Wave three, row {i}", 8) for i in range(3)])
    assert batcher.cache is cache and len(batcher.rows) == 8


def test_a_wide_row_after_narrow_ones_takes_few_slots(fp32: tuple[object, object]) -> None:
    # Slots are bounded by the batch's tokens at the width the rows need: many narrow rows'
    # slot count is not carried over to a buffer a wide row makes wide.
    engine = Engine(*fp32, batch_tokens=4096)
    batcher = engine.batcher
    batcher.admit([_row(engine, f"Row {i}", 4) for i in range(6)])
    assert batcher.cache is not None and batcher.cache.slots == 256  # max_rows
    batcher.leave(batcher.rows[1:])
    wide = _row(engine, "A very long prompt " * 60, 200)
    batcher.admit([wide])
    assert batcher.cache.slots == 4096 // wide.length


def _decode_all(
    fp32: tuple[Any, Any], window: int, budgets: list[int], stop_ids: list[int], stops: list[str]
) -> tuple[dict[int, tuple[list[int], str | None]], int]:
    """The PROMPTS with these budgets through three slots, rows joining as slots free up, with
    `window` decode steps a read; each row's tokens and finish, and the `step` calls made."""
    model, tokenizer = fp32
    batcher = Batcher(model, stop_ids, 4096, 3, tokenizer.decode)
    batcher.steps_per_read = window
    waiting = [
        Row(key=i, ids=tokenizer(p)["input_ids"], budget=n, stops=stops)
        for i, (p, n) in enumerate(zip(PROMPTS, budgets, strict=True))
    ]
    done: dict[int, tuple[list[int], str | None]] = {}
    calls = 0
    while waiting or batcher.rows:
        group = []
        while waiting and batcher.fits(waiting[0], group):
            group.append(waiting.pop(0))
        ended = batcher.admit(group) if group else []
        if batcher.rows:
            ended += batcher.step()
            calls += 1
        done |= {row.key: (row.tokens, row.finish) for row in ended}
    return done, calls


def test_decode_steps_read_back_in_windows_end_each_row_where_single_steps_do(
    fp32: tuple[Any, Any],
) -> None:
    # On a GPU greedy rows run several decode steps before their tokens are read back
    # (STEPS_PER_READ). A row that meets an end token or a stop string inside a window must end
    # where steps read one at a time end it, its later tokens dropped; rows joining between
    # windows must not notice; no window may run past a row's budget.
    assert STEPS_PER_READ == {"cpu": 1, "cuda": 8}
    budgets = [9, 14, 5, 11, 7]
    free, _ = _decode_all(fp32, 1, budgets, [], [])
    # An end token that some row makes part-way (not first, not at its budget), and a stop
    # string that another row's text holds part-way.
    end = next(t for tokens, _ in free.values() for t in tokens[2:-2] if t not in tokens[:2])
    tokenizer = fp32[1]
    stop = next(
        text
        for tokens, _ in free.values()
        if end not in tokens
        for text in [tokenizer.decode(tokens[3:4]).strip()]
        if text and text not in tokenizer.decode(tokens[:3])
    )
    single, single_calls = _decode_all(fp32, 1, budgets, [end], [stop])
    windowed, windowed_calls = _decode_all(fp32, 4, budgets, [end], [stop])
    assert windowed == single
    finishes = [finish for _, finish in single.values()]
    assert "stop" in finishes and "length" in finishes
    assert any(
        finish == "stop" and 1 < len(tokens) < budgets[key]
        for key, (tokens, finish) in single.items()
    )
    assert all(len(tokens) <= budgets[key] for key, (tokens, _) in windowed.items())
    assert windowed_calls < single_calls


def test_a_window_is_one_step_where_a_row_needs_the_host_at_each_token(
    fp32: tuple[Any, Any],
) -> None:
    model, tokenizer = fp32
    batcher = Batcher(model, [], 4096, 4, tokenizer.decode)
    batcher.steps_per_read = 8
    ids = tokenizer("The sea is")["input_ids"]
    batcher.admit([Row(key=0, ids=ids, budget=20), Row(key=1, ids=ids, budget=6)])
    assert batcher.window() == 5  # the shorter row's budget left, after its first token
    batcher.admit([Row(key=2, ids=ids, budget=30)])
    assert batcher.window() == 5
    batcher.admit([Row(key=3, ids=ids, budget=30, sampling=Sampling(temperature=1.0))])
    assert batcher.window() == 1
