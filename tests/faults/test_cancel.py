"""Cancel mid-job: once the cancel is confirmed, the job's rows never change (issue item 5)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from tests.faults.conftest import FaultStack, prompts

TOTAL = 48


def test_cancel_mid_job_stops_every_write(make_stack: Callable[..., FaultStack]) -> None:
    stack = make_stack()
    job_id = stack.api.submit(prompts(TOTAL, sleep=0.3))["id"]
    stack.wait_completed_items(job_id, at_least=6)

    response = stack.api.cancel(job_id)
    confirmed = datetime.now(UTC)
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    done = cancelled["counts"]["completed"]
    assert 6 <= done < TOTAL and cancelled["counts"]["failed"] == 0
    at_cancel = stack.store.items(job_id)

    # A micro-batch was running at the cancel; give it, and a few more, time to come back.
    time.sleep(4)
    rows = stack.store.items(job_id)
    assert rows == at_cancel, "an item was written after the cancel was confirmed"
    statuses = [row.status for row in rows]
    assert statuses.count("completed") == done
    assert statuses.count("cancelled") == TOTAL - done
    assert all(row.finished_at <= confirmed for row in rows if row.finished_at is not None)
    job = stack.store.job(job_id)
    assert (job.status, job.completed, job.failed) == ("cancelled", done, 0)
    info = stack.api.job(job_id)
    assert info["status"] == "cancelled" and info["counts"] == cancelled["counts"]
    assert [line["index"] for line in stack.api.results(job_id)] == [
        row.index for row in rows if row.status == "completed"
    ]
    assert stack.api.cancel(job_id).status_code == 409

    # The worker let go of the cancelled job: the next one is served at once.
    after = stack.api.submit(prompts(4))["id"]
    stack.wait_job(after, timeout=60)
    stack.check_each_item_once(after, 4, completed=4)
    assert stack.store.items(job_id) == at_cancel
