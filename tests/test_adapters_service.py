"""A LoRA adapter trained here, registered with the CLI and served through the whole path
(API -> Redis -> worker -> SQL): its answers are PEFT's own, token for token, and its labels'
probabilities PEFT's scores; the base's and other adapters' jobs run beside it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest
from jsonschema import validate
from openai import OpenAI

from gemma_batch.cli.stack import LocalStack
from tests.adapters import (
    PROMPTS,
    peft_generate,
    peft_label_probs,
    peft_model,
    random_lora,
    train_lora,
)
from tests.conftest import REAL, RUN, run_cli

pytestmark = pytest.mark.real_model
TUNED, NOISY = f"tuned-{RUN}", f"noisy-{RUN}"
TOKENS = 10
REVIEWS = [
    "Review: A wonderful, joyful film.\nSentiment:",
    "Review: Dull and far too long.\nSentiment:",
]
CHOICES = ["positive", "negative"]


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    return {"GEMMA_BATCH_MODEL": REAL}


@pytest.fixture(scope="module")
def sources(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two adapters made with PEFT (one trained a few steps on CPU), registered with the CLI."""
    base, folder = model_dir / REAL, tmp_path_factory.mktemp("trained")
    made = {
        TUNED: train_lora(base, folder / "tuned"),
        NOISY: random_lora(base, folder / "noisy", ["k_proj", "up_proj"], seed=5),
    }
    for name, source in made.items():
        out = run_cli("model", "prepare", str(source), "--adapter-of", REAL, "--name", name)
        assert out.returncode == 0, out.stderr
    return made


def test_adapters_answer_as_peft_beside_the_base(
    stack: LocalStack, sources: dict[str, Path], model_dir: Path
) -> None:
    client = stack.client()
    items = [{"id": str(i), "prompt": prompt} for i, prompt in enumerate(PROMPTS)]
    params = {"max_new_tokens": TOKENS}
    jobs = {name: client.submit(name, items, params) for name in (REAL, TUNED, NOISY)}
    assert jobs[TUNED].info.model == TUNED  # the job shows the adapter it runs with
    base = model_dir / REAL
    for name, job in jobs.items():
        info = job.wait(poll=0.5)
        assert info.status == "completed", stack.log("worker")[-3000:]
        got = [line["output"] for line in job.results()]
        expected = peft_generate(peft_model(base, sources.get(name)), base, PROMPTS, TOKENS)
        assert got == expected, name
        if name == TUNED:
            plain = peft_generate(peft_model(base, None), base, PROMPTS, TOKENS)
            assert all(a != b for a, b in zip(got, plain, strict=True)), "training changed nothing"
    log = stack.log("worker")
    assert f"loaded adapter {TUNED}" in log and f"loaded adapter {NOISY}" in log


def test_openai_clients_pick_an_adapter_by_name(
    stack: LocalStack, sources: dict[str, Path], model_dir: Path
) -> None:
    client = OpenAI(base_url=f"{stack.url}/v1", api_key=stack.api_key, max_retries=0)
    listed = {model.id: model for model in client.models.list()}
    assert listed[TUNED].model_extra == {"parent": REAL}
    assert listed[REAL].model_extra == {"parent": None}
    answer = client.completions.create(
        model=TUNED, prompt=PROMPTS[1], max_tokens=TOKENS, temperature=0
    )
    base = model_dir / REAL
    (expected,) = peft_generate(peft_model(base, sources[TUNED]), base, PROMPTS[1:2], TOKENS)
    assert (answer.model, answer.choices[0].text) == (TUNED, expected)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model=f"untrained-{RUN}", prompt="x", max_tokens=2)
    assert missing.value.code == "model_not_found"


def test_openai_batch_lines_name_an_adapter(
    stack: LocalStack, sources: dict[str, Path], model_dir: Path, tmp_path: Path
) -> None:
    client = OpenAI(base_url=f"{stack.url}/v1", api_key=stack.api_key, max_retries=0)
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": TUNED, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0},
        }
        for i, prompt in enumerate(PROMPTS[:3])
    ]
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    upload = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 120
    while (batch := client.batches.retrieve(batch.id)).status != "completed":
        assert time.monotonic() < deadline and batch.status != "failed", batch
        time.sleep(0.3)
    assert batch.output_file_id is not None
    out = [
        json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()
    ]
    got = {line["custom_id"]: line["response"]["body"] for line in out}
    base = model_dir / REAL
    expected = peft_generate(peft_model(base, sources[TUNED]), base, PROMPTS[:3], TOKENS)
    for i, text in enumerate(expected):
        assert got[f"r{i}"]["model"] == TUNED
        assert got[f"r{i}"]["choices"][0]["text"] == text


def test_unknown_adapter_is_404_at_submit(stack: LocalStack) -> None:
    body = {"model": f"untrained-{RUN}", "items": [{"prompt": "x"}]}
    response = stack.client().http.post("/v1/jobs", json=body)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_labels_with_an_adapter_equal_peft_scores(
    stack: LocalStack, sources: dict[str, Path], model_dir: Path
) -> None:
    client = stack.client()
    rows = [{"review": review} for review in REVIEWS]
    job = client.label(rows, "{review}", CHOICES, TUNED)
    assert job.wait(poll=0.5).status == "completed", stack.log("worker")[-3000:]
    base = model_dir / REAL
    model = peft_model(base, sources[TUNED])
    for line, review in zip(job.results(), REVIEWS, strict=True):
        expected = peft_label_probs(model, base, review, CHOICES)
        for choice in CHOICES:
            assert line["label_probs"][choice] == pytest.approx(expected[choice], abs=1e-4)


def test_structured_output_with_an_adapter(stack: LocalStack, sources: dict[str, Path]) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    body = {
        "model": NOISY,
        "items": [{"prompt": "Is the sky blue? Answer in JSON:"}],
        "params": {"max_new_tokens": 24},
        "json_schema": schema,
    }
    job = stack.client().job(stack.client().request("POST", "/v1/jobs", json=body)["id"])
    assert job.wait(poll=0.5).status == "completed"
    (line,) = job.results()
    assert line["error"] is None, line
    validate(json.loads(line["output"]), schema)
