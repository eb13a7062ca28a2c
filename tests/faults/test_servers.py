"""The servers the stack depends on fail mid-job: Redis comes back empty, PostgreSQL goes away.

Issue items 2 (Redis restarted empty mid-job: the reconciler re-enqueues, every item once) and 3
(PostgreSQL restarted mid-job, or its connections killed: the job completes, nothing lost). Each
test restarts a server of its own, never the machine's shared ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.faults.conftest import FaultStack, prompts

TOTAL = 48  # six chunks of 8, in micro-batches of two or three rows


def test_redis_restarted_empty_mid_job(make_stack: Callable[..., FaultStack]) -> None:
    stack = make_stack()
    job_id = stack.api.submit(prompts(TOTAL, sleep=0.3))["id"]
    stack.wait_completed_items(job_id, at_least=8)
    queued = stack.redis.queued_chunks()
    assert queued, "no chunk was waiting in Redis: nothing to lose, nothing tested"

    before = stack.redis.client().info("server")["run_id"]
    stack.redis.restart_empty()
    # A new server with nothing kept: every message is gone. (Not checked by reading the queue:
    # the dispatcher and its sweep may send chunks again within a moment of the restart.)
    assert stack.redis.client().info("server")["run_id"] != before
    assert stack.store.job(job_id).completed < TOTAL

    stack.wait_job(job_id, timeout=120)
    rows = stack.check_each_item_once(job_id, TOTAL, completed=TOTAL)
    # No worker died: the chunk that was running went on, and no item ran twice.
    assert [row.attempts for row in rows] == [1] * TOTAL


@pytest.mark.parametrize("fault", ["restart", "connections killed"])
def test_postgres_outage_mid_job(make_stack: Callable[..., FaultStack], fault: str) -> None:
    """The job's database goes away under the API and the worker while results are coming in.

    "restart": an immediate shutdown (to its clients, a crash), three seconds down, a start.
    "connections killed": pg_terminate_backend on every session of the job's database, every
    50 ms for four seconds.
    """
    stack = make_stack(private_postgres=True)
    assert stack.postgres is not None
    job_id = stack.api.submit(prompts(TOTAL, sleep=0.3))["id"]
    stack.wait_completed_items(job_id, at_least=8)

    if fault == "restart":
        stack.postgres.restart("immediate", down=3.0)
    else:
        # Again and again for a while, so that sessions in the middle of a query are cut too,
        # not only idle ones in a pool (which a pre-ping would quietly replace).
        killed, deadline = 0, time.monotonic() + 4
        while time.monotonic() < deadline:
            killed += stack.postgres.terminate_connections("gemma_batch")
            time.sleep(0.05)
        assert killed > 0
    assert stack.store.job(job_id).completed < TOTAL, "the job ended first: nothing was tested"

    stack.wait_job(job_id, timeout=150)
    rows = stack.check_each_item_once(job_id, TOTAL, completed=TOTAL)
    assert [row.attempts for row in rows] == [1] * TOTAL
