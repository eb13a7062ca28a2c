"""Logprobs are the model's own: at each generated token, log_softmax of the logits that a plain
forward pass over the prompt and the tokens so far gives, for rows batched together, greedy or
sampled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import WorkItem
from tests.conftest import TINY
from worker.engine.batcher import Row
from worker.engine.engine import Engine
from worker.engine.loader import load_model

PROMPTS = ["The capital of France is", "Hi", "Once upon a time, in a land far away, there lived"]


@pytest.fixture(scope="module")
def fp32(model_dir: Path) -> tuple[Any, Any]:
    return load_model(model_dir / TINY, "none", "cpu")


def _reference(model: Any, row: Row) -> torch.Tensor:
    """log_softmax of the logits before each token the row made, from one forward pass."""
    ids = torch.tensor([row.ids + row.tokens])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()
    return torch.log_softmax(logits[len(row.ids) - 1 : -1], dim=-1)


def _run_rows(engine: Engine, params: GenerationParams) -> list[Row]:
    spec = JobSpec(params=params)
    rows = [engine.prepare(WorkItem(i, p, None), spec) for i, p in enumerate(PROMPTS)]
    assert all(isinstance(row, Row) for row in rows)
    ended, deferred = engine.admit(rows)  # type: ignore[arg-type]
    assert deferred == []
    while engine.batcher.rows:
        ended += engine.step()
    return ended


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_logprobs_are_the_models_own(fp32: tuple[Any, Any], temperature: float) -> None:
    model, tokenizer = fp32
    engine = Engine(model, tokenizer, batch_tokens=4096)
    params = GenerationParams(
        max_new_tokens=8, temperature=temperature, seed=7, logprobs=True, top_logprobs=5
    )
    rows = _run_rows(engine, params)
    assert len(rows) == len(PROMPTS)
    for row in rows:
        expected = _reference(model, row)
        assert [step.token for step in row.logprobs] == row.tokens
        for position, step in enumerate(row.logprobs):
            assert step.logprob == pytest.approx(float(expected[position, step.token]), abs=1e-4)
            values, ids = torch.topk(expected[position], 5)
            assert [token for token, _ in step.top] == ids.tolist()
            assert [value for _, value in step.top] == pytest.approx(values.tolist(), abs=1e-4)
        # As results give them: each token's text and bytes, alternatives most likely first.
        result = engine.result(row)
        assert result.logprobs is not None
        assert len(result.logprobs) == len(row.tokens)
        for step, entry in zip(row.logprobs, result.logprobs, strict=True):
            assert entry["token"] == tokenizer.decode([step.token], skip_special_tokens=True)
            assert entry["bytes"] == list(entry["token"].encode())
            assert entry["logprob"] == step.logprob
            logprobs = [alternative["logprob"] for alternative in entry["top_logprobs"]]
            assert logprobs == sorted(logprobs, reverse=True) and len(logprobs) == 5


def test_no_logprobs_unless_asked(fp32: tuple[Any, Any]) -> None:
    engine = Engine(*fp32, batch_tokens=4096)
    rows = _run_rows(engine, GenerationParams(max_new_tokens=4))
    assert all(row.logprobs == [] for row in rows)
    assert all(engine.result(row).logprobs is None for row in rows)
