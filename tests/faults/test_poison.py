"""One poison item in a batch of 64: it fails alone, with its reason, and is not run forever.

Issue item 4, once with an item whose batch raises and once with one that kills the worker process
that runs it (the engine's test-only hooks, GEMMA_BATCH_FAULT_INJECTION).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.faults.conftest import FAULT_ENV, FaultStack, prompts

TOTAL = 64
POISON = 37
MAX_ATTEMPTS = int(FAULT_ENV["GEMMA_BATCH_MAX_ATTEMPTS"])


@pytest.mark.parametrize("fault", ["@@raise@@", "@@kill@@"])
def test_poison_item_fails_alone_and_the_rest_complete(
    make_stack: Callable[..., FaultStack], fault: str
) -> None:
    # The 64 items are one chunk, run in micro-batches of several rows, so the poison item
    # shares its batch with others that must not fail with it.
    stack = make_stack(env={"GEMMA_BATCH_CHUNK_SIZE": "64", "GEMMA_BATCH_BATCH_TOKENS": "256"})
    job_id = stack.api.submit(prompts(TOTAL, faults={POISON: fault}))["id"]

    stack.wait_job(job_id, timeout=180)
    rows = stack.check_each_item_once(job_id, TOTAL, completed=TOTAL - 1, failed=1)
    bad = rows[POISON]
    assert bad.status == "failed"
    (line,) = [line for line in stack.api.results(job_id) if line["index"] == POISON]
    assert line["status"] == "failed" and line["error"] == bad.error
    others = [row for row in rows if row.index != POISON]
    if fault == "@@raise@@":
        # Isolated in the same worker by bisecting: nothing ran twice, nothing died.
        assert "injected fault" in bad.error
        assert [row.attempts for row in rows] == [1] * TOTAL
        assert stack.model_loads("worker1") == 1
    else:
        # Each run of it kills the worker process; after MAX_ATTEMPTS such runs it is failed.
        assert "died" in bad.error and "injected fault" not in bad.error, bad.error
        assert bad.attempts == MAX_ATTEMPTS
        assert all(row.attempts in (1, 2) for row in others), [r.attempts for r in others]
        assert stack.model_loads("worker1") == 1 + MAX_ATTEMPTS  # a new pool child per kill

    # No endless redelivery: once the job is over, nothing runs, dies or is delivered again.
    before = (
        [row.attempts for row in rows],
        stack.received("worker1"),
        stack.model_loads("worker1"),
    )
    lease = float(FAULT_ENV["GEMMA_BATCH_LEASE_SECONDS"])
    time.sleep(2 * lease + 2 * float(FAULT_ENV["GEMMA_BATCH_RECONCILE_INTERVAL"]))
    after = (
        [row.attempts for row in stack.store.items(job_id)],
        stack.received("worker1"),
        stack.model_loads("worker1"),
    )
    assert after == before, "the job went on being delivered after it was over"
    assert stack.store.job(job_id).status == "completed"
