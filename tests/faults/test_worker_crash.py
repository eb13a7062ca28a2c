"""A worker killed outright, or told to stop, in the middle of a job: nothing lost, nothing twice.

Issue items 1 (kill -9 the worker after some results are stored, start a new one) and 8 (SIGTERM
to a worker mid-chunk: the chunk finishes or is handed back).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import pytest

from tests.faults.conftest import FaultStack, prompts, wait_for

TOTAL = 48  # six chunks of 8, in micro-batches of two or three rows
CHUNK = 8


@pytest.mark.parametrize("victim", ["whole worker", "pool child"])
def test_killed_worker_loses_nothing_and_repeats_nothing(
    make_stack: Callable[..., FaultStack], victim: str
) -> None:
    """kill -9 while a chunk runs, after some results are stored.

    "whole worker": every process of `gemma-batch worker` (supervisor, Celery main process and
    its pool child) dies at once, as in a lost machine or container; a new worker is started.
    "pool child": only the process running the chunk dies (the OOM killer's choice); Celery's
    main process forks a new one itself, and that is the new worker.
    """
    stack = make_stack()
    job_id = stack.api.submit(prompts(TOTAL, sleep=0.3))["id"]
    stack.wait_completed_items(job_id, at_least=10)
    if victim == "whole worker":
        stack.kill_worker("worker1")
        left = stack.store.job(job_id)
        assert left.completed < TOTAL, "the job ended before the kill: nothing was tested"
        stack.start_worker("worker2")
    else:
        stack.kill_pool_child("worker1")
        left = stack.store.job(job_id)
        assert left.completed < TOTAL, "the job ended before the kill: nothing was tested"
        stack.wait_worker_ready("worker1", loads=2)  # a new child, with the model loaded again
    # Everything stored before the kill (and, for a racing micro-batch, a moment after).
    stored = {row.index: row for row in stack.store.items(job_id) if row.status == "completed"}
    assert len(stored) >= 10

    stack.wait_job(job_id, timeout=120)
    rows = stack.check_each_item_once(job_id, TOTAL, completed=TOTAL)

    for index, before in stored.items():
        after = rows[index]
        assert (after.output, after.finished_at, after.attempts) == (
            before.output,
            before.finished_at,
            1,
        ), f"item {index}, stored before the kill, was written again"
    # Only the chunk that was running when the worker died ran anything a second time.
    assert all(1 <= row.attempts <= 2 for row in rows), [row.attempts for row in rows]
    rerun = [row for row in rows if row.attempts == 2]
    assert len({row.chunk for row in rerun}) <= 1 and len(rerun) <= CHUNK, rerun


def test_sigterm_mid_chunk_finishes_or_hands_back_the_chunk(
    make_stack: Callable[..., FaultStack],
) -> None:
    """SIGTERM to `gemma-batch worker` (what `docker stop` sends) while a chunk is half done."""
    stack = make_stack()
    job_id = stack.api.submit(prompts(TOTAL, sleep=0.3))["id"]

    def half_done_chunk() -> bool:
        states: dict[int, set[str]] = defaultdict(set)
        for row in stack.store.items(job_id):
            states[row.chunk].add(row.status)
        return any({"completed", "pending"} <= seen for seen in states.values())

    wait_for(half_done_chunk, 60, lambda: stack.describe(job_id), pause=0.05)
    stack.terminate_worker("worker1")
    try:
        code = stack.processes["worker1"].wait(60)
    except Exception as exc:
        raise AssertionError(f"the worker did not stop on SIGTERM:\n{stack.tails()}") from exc
    assert code == 0, f"the worker's shutdown was not clean (exit {code}):\n{stack.tails()}"

    # Nothing is left in limbo: no message delivered and unacknowledged, and every released
    # chunk with work left has its task waiting in Redis for the next worker (the dispatcher
    # releases the others later).
    redis = stack.redis.client()
    assert redis.hlen("unacked") == 0, "a chunk's message was left unacknowledged"
    rows = stack.store.items(job_id)
    released = stack.store.released(job_id)
    unfinished = {
        (job_id, row.chunk) for row in rows if row.status == "pending" and row.chunk < released
    }
    assert unfinished, "the job ended before the worker stopped: nothing was tested"
    assert unfinished <= stack.redis.queued_chunks(), "a chunk's task was dropped"

    stack.start_worker("worker2")
    stack.wait_job(job_id, timeout=120)
    rows = stack.check_each_item_once(job_id, TOTAL, completed=TOTAL)
    assert [row.attempts for row in rows] == [1] * TOTAL, "an item was computed twice"
