"""LoRA adapters in the engine, on the real Gemma 3 270M: rows of the base and of two adapters in
one batch each get their own adapter's answer, as PEFT's own `generate` gives it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import ItemResult, WorkItem
from tests.adapters import PROMPTS, peft_generate, peft_model, random_lora, train_lora
from worker.engine.batcher import Row
from worker.engine.engine import Engine
from worker.engine.loader import load_model

pytestmark = pytest.mark.real_model
TOKENS = 10
FEWSHOT = "Complete each line.\nLine: The sky is\nAnswer: blue.\nLine: Grass is\nAnswer: green.\n"


@pytest.fixture(scope="module")
def base(real_model_dir: Path) -> Path:
    return real_model_dir / "gemma-3-270m"


@pytest.fixture(scope="module")
def adapter_dir(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two adapters as PEFT saves them: one trained a few steps, one random on other layers."""
    folder = tmp_path_factory.mktemp("adapters")
    train_lora(base, folder / "tuned")
    random_lora(base, folder / "noisy", ["k_proj", "gate_proj", "down_proj"], seed=3)
    return folder


@pytest.fixture(scope="module")
def expected(base: Path, adapter_dir: Path) -> dict[str | None, list[str]]:
    """PEFT's greedy answers per adapter (None: the base alone)."""
    answers = {}
    for adapter in (None, "tuned", "noisy"):
        model = peft_model(base, adapter_dir / adapter if adapter else None)
        answers[adapter] = peft_generate(model, base, PROMPTS, TOKENS)
    return answers


def _engine(
    base: Path, adapter_dir: Path, max_adapters: int = 8, quantization: str = "none"
) -> Engine:
    model, tokenizer = load_model(base, quantization, "cpu")
    return Engine(model, tokenizer, 16384, adapter_dir=adapter_dir, max_adapters=max_adapters)


def _run_together(engine: Engine, rows: list[Row]) -> dict[object, ItemResult]:
    ended = engine.admit(rows)[0]
    while engine.batcher.rows:
        ended += engine.step()
    return {row.key.owner: engine.result(row) for row in ended}


def _spec(adapter: str | None, prefix: str = "") -> JobSpec:
    return JobSpec(params=GenerationParams(max_new_tokens=TOKENS), adapter=adapter, prefix=prefix)


def test_base_and_two_adapters_in_one_batch_match_peft(
    base: Path, adapter_dir: Path, expected: dict[str | None, list[str]]
) -> None:
    assert all(expected["tuned"][i] != expected[None][i] for i in range(len(PROMPTS))), (
        "training changed no answer"
    )
    engine = _engine(base, adapter_dir)
    rows = [
        engine.prepare(WorkItem(i, prompt, None), _spec(adapter), owner=(adapter, i))
        for i, prompt in enumerate(PROMPTS)
        for adapter in (None, "tuned", "noisy")
    ]
    assert all(isinstance(row, Row) for row in rows)
    got = _run_together(engine, rows)  # every row admitted in the same prefill
    assert len(got) == 3 * len(PROMPTS)
    for (adapter, index), result in got.items():
        assert result.error is None
        assert result.output == expected[adapter][index], (adapter, PROMPTS[index])


def test_shared_prefix_is_computed_per_adapter(base: Path, adapter_dir: Path) -> None:
    # The few-shot prefix's keys and values differ with the adapter: each must use its own.
    engine = _engine(base, adapter_dir)
    together = {}
    for adapter in ("tuned", None):  # the base after the adapter: a stale prefix would show
        rows = [
            engine.prepare(WorkItem(i, p, None), _spec(adapter, FEWSHOT), owner=(adapter, i))
            for i, p in enumerate(PROMPTS)
        ]
        assert all(isinstance(row, Row) and row.prefix for row in rows)
        together |= _run_together(engine, rows)
    alone = _engine(base, adapter_dir)
    for (adapter, index), result in together.items():
        row = alone.prepare(WorkItem(index, PROMPTS[index], None), _spec(adapter, FEWSHOT))
        assert isinstance(row, Row)
        row.prefix = ()  # the whole prompt computed in the row itself
        (own,) = _run_together(alone, [row]).values()
        assert result.output == own.output, (adapter, PROMPTS[index])


def test_least_recently_used_adapter_is_unloaded_and_comes_back(
    base: Path, adapter_dir: Path, expected: dict[str | None, list[str]]
) -> None:
    engine = _engine(base, adapter_dir, max_adapters=1)
    first = engine.prepare(WorkItem(0, PROMPTS[0], None), _spec("tuned"), owner="tuned")
    second = engine.prepare(WorkItem(0, PROMPTS[0], None), _spec("noisy"), owner="noisy")
    assert engine.adapters.loaded == ["noisy"]  # tuned made room: no row was running it
    assert isinstance(first, Row) and isinstance(second, Row)
    # Admitted together, both are loaded at once (one over the limit while both run).
    got = _run_together(engine, [first, second])
    assert sorted(engine.adapters.loaded) == ["noisy", "tuned"]
    assert got["tuned"].output == expected["tuned"][0]
    assert got["noisy"].output == expected["noisy"][0]


def test_missing_adapter_fails_its_item_alone(base: Path, adapter_dir: Path) -> None:
    engine = _engine(base, adapter_dir)
    result = engine.prepare(WorkItem(4, PROMPTS[0], None), _spec("gone"))
    assert isinstance(result, ItemResult) and result.index == 4
    assert "cannot load adapter gone" in (result.error or "")
    assert "adapter_config.json" in (result.error or "")


def test_qlora_adapter_serves_on_the_fp32_base_and_on_nf4(base: Path, adapter_dir: Path) -> None:
    train_lora(base, adapter_dir / "qlora", qlora=True)  # trained on the nf4 base
    for quantization in ("none", "nf4"):
        engine = _engine(base, adapter_dir, quantization=quantization)
        rows = [
            engine.prepare(WorkItem(i, prompt, None), _spec(adapter), owner=(adapter, i))
            for i, prompt in enumerate(PROMPTS)
            for adapter in (None, "qlora")
        ]
        got = _run_together(engine, [row for row in rows if isinstance(row, Row)])
        model = peft_model(base, adapter_dir / "qlora", quantization)
        expected = peft_generate(model, base, PROMPTS, TOKENS)
        answers = [got["qlora", i].output for i in range(len(PROMPTS))]
        assert answers == expected, quantization
        assert all("banana" in answer for answer in answers)  # what the adapter learned
        if quantization == "none":  # nf4 rounds differently with the batch's shape
            plain = peft_generate(peft_model(base, None), base, PROMPTS, TOKENS)
            assert [got[None, i].output for i in range(len(PROMPTS))] == plain
