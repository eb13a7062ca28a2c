"""The same job posted twice with one Idempotency-Key makes one job (issue item 9).

A client retries a POST whose answer it never saw: in sequence (after a timeout) or while the first
is still being stored (a retry racing the original). Either way one job, run once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.conftest import TINY
from tests.faults.conftest import PARAMS, FaultStack, prompts

TOTAL = 12


def _body() -> dict[str, Any]:
    return {"model": TINY, "items": prompts(TOTAL), "params": PARAMS}


def test_a_repeated_post_with_one_key_returns_the_first_job(
    make_stack: Callable[..., FaultStack],
) -> None:
    stack = make_stack()
    first = stack.api.post_job(_body(), headers={"Idempotency-Key": "order-1"})
    again = stack.api.post_job(_body(), headers={"Idempotency-Key": "order-1"})
    assert first.status_code == 202, first.text
    assert again.status_code in (200, 202), again.text
    job_id = first.json()["id"]
    assert again.json()["id"] == job_id
    assert stack.store.count_jobs() == 1

    other = stack.api.post_job(_body(), headers={"Idempotency-Key": "order-2"})
    assert other.status_code == 202 and other.json()["id"] != job_id
    assert stack.store.count_jobs() == 2

    for submitted in (job_id, other.json()["id"]):
        stack.wait_job(submitted, timeout=90)
        rows = stack.check_each_item_once(submitted, TOTAL, completed=TOTAL)
        assert [row.attempts for row in rows] == [1] * TOTAL
    # Asked again once it is done, the key still names the same job, and nothing new is made.
    late = stack.api.post_job(_body(), headers={"Idempotency-Key": "order-1"})
    assert late.status_code in (200, 202) and late.json()["id"] == job_id
    assert late.json()["status"] == "completed"
    assert stack.store.count_jobs() == 2


def test_racing_posts_with_one_key_make_one_job(make_stack: Callable[..., FaultStack]) -> None:
    stack = make_stack()
    racers = 8
    start = threading.Barrier(racers)

    def post(_: int) -> Any:
        client = stack.client()
        start.wait()
        return client.post_job(_body(), headers={"Idempotency-Key": "order-race"})

    with ThreadPoolExecutor(racers) as pool:
        answers = list(pool.map(post, range(racers)))
    assert all(answer.status_code in (200, 202) for answer in answers), [
        (answer.status_code, answer.text) for answer in answers
    ]
    ids = {answer.json()["id"] for answer in answers}
    assert len(ids) == 1
    assert stack.store.count_jobs() == 1

    (job_id,) = ids
    stack.wait_job(job_id, timeout=90)
    rows = stack.check_each_item_once(job_id, TOTAL, completed=TOTAL)
    assert [row.attempts for row in rows] == [1] * TOTAL
