"""The real Gemma 3 270M, quantized to nf4, through the same API -> Redis -> worker path."""

from __future__ import annotations

import json

import pytest
from jsonschema import validate

from gemma_batch.cli.demo import fewshot
from gemma_batch.cli.stack import LocalStack
from tests.conftest import REAL

pytestmark = pytest.mark.real_model
MODEL = REAL  # the real Gemma 3 270M, under this run's name


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    return {"GEMMA_BATCH_MODEL": MODEL, "GEMMA_BATCH_QUANTIZATION": "nf4"}


def test_real_gemma_answers_correctly(stack: LocalStack) -> None:
    items = [
        {"id": "capital", "prompt": "The capital of France is Paris. The capital of Germany is"},
        {
            "id": "good",
            "prompt": "Review: A wonderful, joyful film. I loved every minute.\nSentiment:",
        },
        {"id": "bad", "prompt": "Review: Dreadful. Boring, ugly and a waste of money.\nSentiment:"},
    ]
    client = stack.client()
    job = client.submit(MODEL, items[:1], {"max_new_tokens": 4})
    label_job = {
        "model": MODEL,
        "items": items[1:],
        "prefix": fewshot(),
        "choices": ["positive", "negative"],
    }
    labelled = client.job(client.request("POST", "/v1/jobs", json=label_job)["id"])
    info = job.wait(poll=0.5)
    labelled.wait(poll=0.5)
    log = stack.log("worker")
    assert info.status == "completed", log[-2000:]
    assert "loaded model gemma-3-270m (nf4, cpu)" in log and f"model {MODEL} ready" in log
    assert next(job.results())["output"].strip().startswith("Berlin")
    answers = {line["id"]: line for line in labelled.results()}
    assert (
        answers["good"]["label"] == "positive" and answers["good"]["label_probs"]["positive"] > 0.5
    )
    assert answers["bad"]["label"] == "negative" and answers["bad"]["label_probs"]["negative"] > 0.5


def test_json_schema_outputs_all_validate(stack: LocalStack) -> None:
    schema = {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative"]},
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["sentiment", "stars"],
        "additionalProperties": False,
    }
    reviews = [
        "Loved it, wonderful.",
        "Terrible and boring.",
        "Fine, nothing special.",
        "Best ever!",
    ]
    items = [{"id": str(i), "prompt": f"Review: {text}\nJSON:"} for i, text in enumerate(reviews)]
    body = {"model": MODEL, "items": items, "params": {"max_new_tokens": 32}, "json_schema": schema}
    client = stack.client()
    job = client.job(client.request("POST", "/v1/jobs", json=body)["id"])
    assert job.wait(poll=0.5).counts.completed == len(items)
    for line in job.results():
        validate(json.loads(line["output"]), schema)
