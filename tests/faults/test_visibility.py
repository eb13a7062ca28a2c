"""A chunk that outlives a deliberately short visibility timeout (issue item 10).

Redis hands the chunk's message out again while the first worker still runs it; the second
delivery finds every item leased by a live worker and computes nothing: every item is computed
once and stored once.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from tests.faults.conftest import FaultStack, prompts, wait_for

TOTAL = 8  # one chunk
VISIBILITY = 3.0
# Per item (the hook sleeps the sum over a micro-batch): the chunk runs some 48 s, so that it is
# still running when a second worker has started and taken the redelivered chunk (on a busy
# 2-core machine that start took 17 s, and 24 s of sleep was once too short).
SLEEP = 6.0


def test_chunk_outliving_the_visibility_timeout_is_computed_once(
    make_stack: Callable[..., FaultStack],
) -> None:
    stack = make_stack(
        env={
            "GEMMA_BATCH_VISIBILITY_TIMEOUT": str(VISIBILITY),
            # Not killed at the visibility timeout: the point is a chunk that runs past it.
            "GEMMA_BATCH_TASK_TIME_LIMIT": "120",
        }
    )
    job_id = stack.api.submit(prompts(TOTAL, sleep=SLEEP))["id"]
    (task,) = wait_for(
        lambda: stack.received("worker1"), 30, lambda: stack.describe(job_id), pause=0.1
    )
    # kombu hands out again the messages left unacknowledged past the visibility timeout when a
    # consumer starts (and then every unacked_restore_interval x throttle seconds). Once the
    # chunk is past it, a second, idle worker starts, and so Redis redelivers the chunk to it.
    time.sleep(VISIBILITY)
    stack.start_worker("worker2")
    redelivered = re.compile(rf"run_chunk\[{task}\] succeeded in [0-9.]+s: (\{{.*\}})")
    outcome = wait_for(
        lambda: redelivered.search(stack.log("worker2")),
        60,
        lambda: f"the chunk was never redelivered, so nothing was tested:\n{stack.tails()}",
    )
    # The second delivery was over while the first still ran, and it stored nothing.
    assert stack.store.job(job_id).completed < TOTAL, "redelivered too late to test the lease"
    assert outcome.group(1) == "{'stored': 0}"

    stack.wait_job(job_id, timeout=90)
    rows = stack.check_each_item_once(job_id, TOTAL, completed=TOTAL)
    assert [row.attempts for row in rows] == [1] * TOTAL, "an item was computed twice"
    finished = sorted(row.finished_at for row in rows)
    assert (finished[-1] - finished[0]).total_seconds() > VISIBILITY, "the chunk was not slow"
