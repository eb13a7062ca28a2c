"""500 submissions at once from 20 client threads: every one accepted, every job completed.

Issue item 6.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import TINY
from tests.faults.conftest import FaultStack, wait_for

THREADS = 20
EACH = 25  # submissions per thread: 500 in all


def test_500_concurrent_submissions_are_all_accepted_and_completed(
    make_stack: Callable[..., FaultStack],
) -> None:
    stack = make_stack()
    start = threading.Barrier(THREADS)

    def submit_many(thread: int) -> list[tuple[int, str | None]]:
        client = stack.client()
        start.wait()
        answers = []
        for number in range(EACH):
            body = {
                "model": TINY,
                "items": [
                    {"id": f"t{thread}-{number}", "prompt": f"Thread {thread}, job {number}"}
                ],
                "params": {"max_new_tokens": 2},
            }
            response = client.post_job(body)
            job_id = response.json().get("id") if response.status_code == 202 else None
            answers.append((response.status_code, job_id or response.text))
        return answers

    with ThreadPoolExecutor(THREADS) as pool:
        answers = [a for batch in pool.map(submit_many, range(THREADS)) for a in batch]

    codes = Counter(code for code, _ in answers)
    assert codes == {202: THREADS * EACH}, [a for a in answers if a[0] != 202][:5]
    ids = {job_id for _, job_id in answers}
    assert len(ids) == THREADS * EACH
    assert stack.store.count_jobs() == THREADS * EACH

    wait_for(
        lambda: stack.store.job_statuses() == {"completed": THREADS * EACH},
        240,
        lambda: f"jobs by state: {stack.store.job_statuses()}\n{stack.tails()}",
        pause=1,
    )
    jobs = stack.store.all_jobs()
    assert {job.id for job in jobs} == ids
    wrong = [job for job in jobs if (job.total, job.completed, job.failed) != (1, 1, 0)]
    assert not wrong, f"{len(wrong)} jobs with wrong counts, e.g. {wrong[:5]}"
    items = stack.store.all_items()
    assert sorted(item.job_id for item in items) == sorted(ids)  # one item row per job
    wrong_items = [item for item in items if (item.status, item.attempts) != ("completed", 1)]
    assert not wrong_items, f"{len(wrong_items)} items not completed once, e.g. {wrong_items[:5]}"
    # A sample through the API too: counts and results as the client sees them.
    for job_id in sorted(ids)[:: THREADS * EACH // 10]:
        stack.check_each_item_once(job_id, 1, completed=1)
