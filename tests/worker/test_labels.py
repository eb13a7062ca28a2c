"""Label mode: probabilities exactly as computed by hand from the model's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemma_batch.domain.params import JobSpec
from gemma_batch.domain.records import WorkItem
from tests.conftest import TINY
from worker.engine.engine import Engine
from worker.engine.loader import load_model

# Longer than the tiny model's 64-token sliding window, so the cached prefix crosses it.
PREFIX = (
    "Classify the reviews.\n" + "Review: fine, good and nice stuff\nSentiment: positive\n\n" * 5
)
PROMPTS = ["Review: I loved it\nSentiment:", "Review: awful, bad and long\nSentiment: ", "meh"]
CHOICES = ["positive", "negative", "very mixed feelings"]


@pytest.fixture(scope="module")
def fp32(model_dir: Path) -> tuple[object, object]:
    return load_model(model_dir / TINY, "none", "cpu")


def _by_hand(model: object, tokenizer: object, text: str) -> list[float]:
    """Sum of log-probabilities of each choice's tokens after the full prompt, one pass each."""
    ids = tokenizer(text)["input_ids"]
    space = "" if text[-1].isspace() else " "
    scores = []
    for choice in CHOICES:
        tokens = tokenizer(space + choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + tokens])).logits[0].float()
        logprobs = logits.log_softmax(-1)
        scores.append(sum(float(logprobs[len(ids) - 1 + k, t]) for k, t in enumerate(tokens)))
    return torch.softmax(torch.tensor(scores, dtype=torch.float64), 0).tolist()


def test_label_probs_match_the_logits_by_hand(fp32: tuple[object, object]) -> None:
    model, tokenizer = fp32
    assert len(tokenizer(" very mixed feelings", add_special_tokens=False)["input_ids"]) >= 2
    engine = Engine(model, tokenizer, batch_tokens=4096)
    items = [WorkItem(i, p, None) for i, p in enumerate(PROMPTS)]
    results = {
        r.index: r for b in engine.run(items, JobSpec(prefix=PREFIX, choices=CHOICES)) for r in b
    }
    assert len(tokenizer(PREFIX)["input_ids"]) > 64
    for item in items:
        expected = _by_hand(model, tokenizer, PREFIX + item.prompt)
        result = results[item.index]
        assert list(result.label_probs) == CHOICES
        assert list(result.label_probs.values()) == pytest.approx(expected, abs=1e-4)
        assert sum(result.label_probs.values()) == pytest.approx(1.0, abs=1e-9)
        assert result.label == CHOICES[max(range(3), key=expected.__getitem__)]


def test_labels_do_not_depend_on_batching(fp32: tuple[object, object]) -> None:
    items = [WorkItem(i, p, None) for i, p in enumerate(PROMPTS * 4)]
    spec = JobSpec(prefix=PREFIX, choices=CHOICES)
    wide = Engine(*fp32, batch_tokens=8192)
    narrow = Engine(*fp32, batch_tokens=200)
    together = {r.index: r.label_probs for b in wide.run(items, spec) for r in b}
    alone = {r.index: r.label_probs for b in narrow.run(items, spec) for r in b}
    for index, probs in together.items():
        assert list(probs.values()) == pytest.approx(list(alone[index].values()), abs=1e-5)
