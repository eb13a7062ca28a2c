"""The official `openai` client, unchanged, against a real API and a real worker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from gemma_batch.cli.stack import LocalStack
from tests.conftest import TINY
from tests.tiny_model import CONTEXT


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    return {"GEMMA_BATCH_CHUNK_SIZE": "4"}


@pytest.fixture
def client(stack: LocalStack) -> OpenAI:
    return OpenAI(base_url=f"{stack.url}/v1", api_key=stack.api_key, max_retries=0)


def _line(custom_id: str, content: str, max_tokens: int = 5, **body: object) -> dict[str, object]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": TINY,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
        }
        | body,
    }


def _upload(client: OpenAI, lines: list[object], tmp_path: Path) -> str:
    path = tmp_path / "batch.jsonl"
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    )
    return client.files.create(file=path.open("rb"), purpose="batch").id


def _wait(
    client: OpenAI,
    batch_id: str,
    until: tuple[str, ...] = ("completed", "failed", "expired", "cancelled"),
):
    deadline = time.monotonic() + 180
    while (batch := client.batches.retrieve(batch_id)).status not in until:
        assert time.monotonic() < deadline, batch
        time.sleep(0.3)
    return batch


def _jsonl(client: OpenAI, file_id: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_batch_of_twenty_chat_requests(client: OpenAI, tmp_path: Path) -> None:
    lines = [_line(f"req-{i}", f"Say something about {i}", temperature=0) for i in range(20)]
    file_id = _upload(client, lines, tmp_path)
    assert client.files.retrieve(file_id).purpose == "batch"
    batch = client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"team": "labelling"},
    )
    assert batch.status == "in_progress" and batch.request_counts.total == 20
    done = _wait(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.completed == 20 and done.request_counts.failed == 0
    assert done.metadata == {"team": "labelling"}
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.error_file_id is None
    answers = {line["custom_id"]: line for line in _jsonl(client, done.output_file_id)}
    assert set(answers) == {f"req-{i}" for i in range(20)}
    for answer in answers.values():
        body = answer["response"]["body"]
        assert answer["error"] is None and answer["response"]["status_code"] == 200
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["role"] == "assistant"
        usage = body["usage"]
        assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= 5
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert batch.id in [b.id for b in client.batches.list(limit=10)]


def test_cancel_mid_way_keeps_partial_output(client: OpenAI, tmp_path: Path) -> None:
    lines = [_line(f"c-{i}", f"Tell a long story about {i}", max_tokens=40) for i in range(200)]
    batch = client.batches.create(
        input_file_id=_upload(client, lines, tmp_path),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    while client.batches.retrieve(batch.id).request_counts.completed == 0:
        time.sleep(0.1)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    done = _wait(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    assert 0 < done.request_counts.completed < 200
    output = _jsonl(client, done.output_file_id)
    assert len(output) == done.request_counts.completed


def test_unusable_files_fail_validation_with_line_numbers(client: OpenAI, tmp_path: Path) -> None:
    malformed = [_line("a", "hi"), "{not json", _line("b", "hi")]
    batch = client.batches.create(
        input_file_id=_upload(client, malformed, tmp_path),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    assert batch.status == "failed" and batch.failed_at
    assert [(e.code, e.line) for e in batch.errors.data] == [("invalid_json_line", 2)]

    bad_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}
    bad_body = [_line("a", "hi"), _line("b", "hi", response_format=bad_format)]
    batch = client.batches.create(
        input_file_id=_upload(client, bad_body, tmp_path),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    (error,) = batch.errors.data
    assert (error.code, error.line) == ("invalid_request", 2) and "JSON Schema" in error.message

    duplicated = [_line("a", "hi"), _line("b", "hi"), _line("a", "again")]
    batch = client.batches.create(
        input_file_id=_upload(client, duplicated, tmp_path),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    assert batch.status == "failed"
    (error,) = batch.errors.data
    assert (error.code, error.line, error.param) == ("duplicate_custom_id", 3, "custom_id")
    assert "repeats line 1" in error.message


def test_a_request_that_fails_at_run_time_goes_to_the_error_file(
    client: OpenAI, tmp_path: Path
) -> None:
    lines = [_line(f"ok-{i}", "hello") for i in range(5)] + [_line("too-long", "word " * CONTEXT)]
    batch = client.batches.create(
        input_file_id=_upload(client, lines, tmp_path),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = _wait(client, batch.id)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 1)
    assert {line["custom_id"] for line in _jsonl(client, done.output_file_id)} == {
        f"ok-{i}" for i in range(5)
    }
    (failed,) = _jsonl(client, done.error_file_id)
    # As OpenAI writes a request that failed: its HTTP answer, the error in the body.
    assert failed["custom_id"] == "too-long" and failed["error"] is None
    assert failed["response"]["status_code"] == 400
    assert failed["response"]["body"]["error"]["code"] == "context_length_exceeded"


def test_chat_completion_and_models(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0
    )
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert 1 <= answer.usage.completion_tokens <= 4
    text = client.completions.create(
        model=TINY, prompt="Once upon a time", max_tokens=3, temperature=0
    )
    assert text.object == "text_completion" and text.usage.completion_tokens <= 3
    assert TINY in [model.id for model in client.models.list()]
    with pytest.raises(openai.NotFoundError, match="unknown model 'gemma-99b'"):
        client.chat.completions.create(
            model="gemma-99b", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError, match="at most 8 non-empty"):
        client.chat.completions.create(
            model=TINY, messages=[{"role": "user", "content": "x"}], stop=[str(i) for i in range(9)]
        )


def test_files_list_and_delete(client: OpenAI, tmp_path: Path) -> None:
    file_id = _upload(client, [_line("x", "hi")], tmp_path)
    assert file_id in [f.id for f in client.files.list(purpose="batch")]
    assert client.files.content(file_id).text.startswith('{"custom_id": "x"')
    assert client.files.delete(file_id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)


def test_expired_batch_answers_what_is_left_with_batch_expired(
    client: OpenAI, stack: LocalStack, tmp_path: Path
) -> None:
    from sqlalchemy import update

    from gemma_batch.store.sessions import session_scope
    from gemma_batch.store.tables import Batch, utcnow

    lines = [_line(f"e-{i}", f"A long tale about {i}", max_tokens=40) for i in range(200)]
    batch = client.batches.create(
        input_file_id=_upload(client, lines, tmp_path),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    with session_scope() as session:  # the 24 hours pass at once
        session.execute(update(Batch).where(Batch.id == batch.id).values(expires_at=utcnow()))
        session.commit()
    done = _wait(client, batch.id)
    assert done.status == "expired" and done.expired_at
    expired = [
        line
        for line in _jsonl(client, done.error_file_id)
        if line["error"]["code"] == "batch_expired"
    ]
    answered = _jsonl(client, done.output_file_id) if done.output_file_id else []
    assert expired and len(expired) + len(answered) == 200
    assert {line["custom_id"] for line in expired}.isdisjoint(
        line["custom_id"] for line in answered
    )
