"""The real Gemma 3 270M, quantized to nf4, through the same API -> Redis -> worker path."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest

from gemma_batch.client import Client
from gemma_batch.stack import LocalStack

FEWSHOT = files("gemma_batch").joinpath("data/fewshot.txt").read_text()


@pytest.mark.real_model
def test_real_gemma_answers_correctly(sqlite_url: str, model_dir: Path, tmp_path: Path) -> None:
    items = [
        {"id": "capital", "prompt": "The capital of France is Paris. The capital of Germany is"},
        {
            "id": "good",
            "prompt": FEWSHOT
            + "Review: A wonderful, joyful film. I loved every minute.\nSentiment:",
        },
        {
            "id": "bad",
            "prompt": FEWSHOT + "Review: Dreadful. Boring, ugly and a waste of money.\nSentiment:",
        },
    ]
    env = {"GEMMA_BATCH_MODEL": "gemma-3-270m", "GEMMA_BATCH_QUANTIZATION": "nf4"}
    with LocalStack(env, tmp_path) as stack:
        job = Client(stack.url).submit("gemma-3-270m", items, {"max_new_tokens": 4})
        info = job.wait(poll=0.5)
        outputs = {line["id"]: line["output"] for line in job.results()}
        log = stack.log("worker")
    assert info.status == "completed", log[-2000:]
    assert "loaded model gemma-3-270m (nf4, cpu)" in log
    assert outputs["capital"].strip().startswith("Berlin")
    assert outputs["good"].strip().startswith("positive")
    assert outputs["bad"].strip().startswith("negative")
