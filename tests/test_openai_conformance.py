"""The official `openai` client against the real stack, every answer checked against OpenAI's
published schemas, and each client exception raised where OpenAI would raise it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from gemma_batch.cli.stack import LocalStack
from tests.conftest import TINY
from tests.openai_spec import check
from tests.tiny_model import CONTEXT


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    # Small enough that one request asking for many answers passes it (RateLimitError).
    return {"GEMMA_BATCH_CHUNK_SIZE": "4", "GEMMA_BATCH_MAX_QUEUED_ITEMS": "60"}


@pytest.fixture
def client(stack: LocalStack) -> OpenAI:
    return OpenAI(base_url=f"{stack.url}/v1", api_key=stack.api_key, max_retries=0)


def _json(raw: Any) -> Any:
    return raw.http_response.json()


def test_files_answer_as_the_spec_says(client: OpenAI, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"custom_id": "a"}) + "\n")
    made = [
        check(
            "OpenAIFile",
            _json(client.files.with_raw_response.create(file=path.open("rb"), purpose="batch")),
        )
        for _ in range(3)
    ]
    newest = check("ListFilesResponse", _json(client.files.with_raw_response.list(limit=2)))
    assert [f["id"] for f in newest["data"]] == [made[2]["id"], made[1]["id"]]
    assert (newest["first_id"], newest["last_id"], newest["has_more"]) == (
        made[2]["id"],
        made[1]["id"],
        True,
    )
    oldest = check(
        "ListFilesResponse",
        _json(client.files.with_raw_response.list(order="asc", after=made[0]["id"], limit=5)),
    )
    assert [f["id"] for f in oldest["data"]][:2] == [made[1]["id"], made[2]["id"]]
    assert oldest["has_more"] is False
    check("OpenAIFile", _json(client.files.with_raw_response.retrieve(made[0]["id"])))
    check("DeleteFileResponse", _json(client.files.with_raw_response.delete(made[0]["id"])))


def _line(
    custom_id: str, body: dict[str, Any], url: str = "/v1/chat/completions"
) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": TINY} | body}


def test_batch_output_and_error_lines_answer_as_the_spec_says(
    client: OpenAI, tmp_path: Path
) -> None:
    chat = [{"role": "user", "content": "Say hi"}]
    lines = [
        _line("plain", {"messages": chat, "max_tokens": 4}),
        _line("logprobs", {"messages": chat, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}),
        _line("three", {"messages": chat, "max_tokens": 3, "n": 3, "seed": 1}),
        # Past the model's context: fails while the batch runs, as OpenAI writes such a line.
        _line(
            "too-long",
            {"messages": [{"role": "user", "content": "hi " * CONTEXT}], "max_tokens": 2},
        ),
    ]
    for line in lines:
        check("BatchRequestInput", line)
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    file_id = client.files.create(file=path.open("rb"), purpose="batch").id
    batch = check(
        "Batch",
        _json(
            client.batches.with_raw_response.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        ),
    )
    deadline = time.monotonic() + 180
    while (done := _json(client.batches.with_raw_response.retrieve(batch["id"])))[
        "status"
    ] != "completed":
        assert time.monotonic() < deadline, done
        time.sleep(0.3)
    check("Batch", done)
    assert done["request_counts"] == {"total": 6, "completed": 5, "failed": 1}
    check("ListBatchesResponse", _json(client.batches.with_raw_response.list()))
    output = [json.loads(x) for x in client.files.content(done["output_file_id"]).text.splitlines()]
    errors = [json.loads(x) for x in client.files.content(done["error_file_id"]).text.splitlines()]
    for line in output + errors:
        check("BatchRequestOutput", line)
    answers = {line["custom_id"]: line["response"]["body"] for line in output}
    assert sorted(answers) == ["logprobs", "plain", "three"]
    for body in answers.values():
        check("CreateChatCompletionResponse", body)
    assert [c["index"] for c in answers["three"]["choices"]] == [0, 1, 2]
    content = answers["logprobs"]["choices"][0]["logprobs"]["content"]
    assert len(content) == answers["logprobs"]["usage"]["completion_tokens"]
    assert all(len(token["top_logprobs"]) == 2 for token in content)
    assert answers["plain"]["choices"][0]["logprobs"] is None
    [failed] = errors
    assert failed["custom_id"] == "too-long" and failed["error"] is None
    assert failed["response"]["status_code"] == 400
    error = check("ErrorResponse", failed["response"]["body"])["error"]
    assert error["code"] == "context_length_exceeded"


def test_sync_answers_with_logprobs_choices_and_prompt_arrays(client: OpenAI) -> None:
    chat = check(
        "CreateChatCompletionResponse",
        _json(
            client.chat.completions.with_raw_response.create(
                model=TINY,
                messages=[{"role": "user", "content": "Name a colour"}],
                max_tokens=5,
                logprobs=True,
                top_logprobs=3,
            )
        ),
    )
    [choice] = chat["choices"]
    assert choice["message"]["refusal"] is None
    tokens = choice["logprobs"]["content"]
    assert len(tokens) == chat["usage"]["completion_tokens"]
    for token in tokens:
        tops = [top["logprob"] for top in token["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert token["logprob"] <= tops[0] + 1e-6
    text = check(
        "CreateCompletionResponse",
        _json(
            client.completions.with_raw_response.create(
                model=TINY, prompt=["One", "Two"], n=2, max_tokens=3, logprobs=2, seed=5
            )
        ),
    )
    assert [c["index"] for c in text["choices"]] == [0, 1, 2, 3]
    for c in text["choices"]:
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
        assert "".join(lp["tokens"]) == c["text"]
        assert all(len(top) <= 2 for top in lp["top_logprobs"])
    # Each of a prompt's n answers has its own seed, so sampled answers differ from one another
    # but repeat exactly when the request is sent again.
    again = client.completions.create(
        model=TINY, prompt=["One", "Two"], n=2, max_tokens=3, logprobs=2, seed=5
    )
    assert [c.text for c in again.choices] == [c["text"] for c in text["choices"]]


def test_models_answer_as_the_spec_says(client: OpenAI, model_dir: Path) -> None:
    listed = check("ListModelsResponse", _json(client.models.with_raw_response.list()))
    assert TINY in [m["id"] for m in listed["data"]]
    model = check("Model", _json(client.models.with_raw_response.retrieve(TINY)))
    assert model["created"] == int((model_dir / TINY / "config.json").stat().st_mtime)
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert _error(missing.value)["code"] == "model_not_found"


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    return check("ErrorResponse", exc.response.json())["error"]


def test_each_client_exception_is_raised_where_openai_raises_it(
    client: OpenAI, stack: LocalStack
) -> None:
    chat = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=TINY, messages=chat, temperature=5)
    assert _error(bad.value)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=TINY,
            messages=chat,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    error = _error(refused.value)
    assert (error["param"], error["message"]) == (
        "tools",
        "tools: 'tools' is not supported by this service",
    )
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        OpenAI(base_url=f"{stack.url}/v1", api_key="gb_wrong", max_retries=0).models.list()
    assert _error(unauthorized.value)["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as unknown_model:
        client.chat.completions.create(model="no-such-model", messages=chat)
    assert _error(unknown_model.value)["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as missing_file:
        client.files.retrieve("file-missing")
    assert _error(missing_file.value)["param"] == "file_id"
    with pytest.raises(openai.NotFoundError) as unknown_route:
        client.get("/no/such/route", cast_to=httpx.Response)
    assert _error(unknown_route.value)["message"] == "Invalid URL (GET /v1/no/such/route)"
    with pytest.raises(openai.RateLimitError) as limited:
        client.completions.create(model=TINY, prompt=["a"] * 10, n=8, max_tokens=1)
    assert _error(limited.value)["code"] == "rate_limit_exceeded"
