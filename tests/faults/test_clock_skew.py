"""A worker whose clock runs 10 minutes ahead of everyone else's: leases are reckoned on
PostgreSQL's clock, so it neither takes items another worker holds nor keeps its own past their
time, and the sweep re-sends nothing early.

The worker's wall clock is moved with time-machine, started in every Python process of the
worker (sitecustomize): each of its reads of the time (time.time, datetime.now) is 10 minutes
ahead and ticks on. Debian's libfaketime (0.9.10) cannot do it for Python 3.11: faking the
monotonic clock makes every timed wait (threading.Event.wait) hang, since sem_clockwait is not
faked, and leaving it alone makes time.sleep fail with EINVAL.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from tests.faults.conftest import FaultStack, prompts, wait_for

TOTAL = 48
SKEW_MINUTES = 10
LOG_TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
AHEAD = """\
import datetime, time_machine
time_machine.travel(
    datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes={minutes}), tick=True
).start()
"""


def _ahead(minutes: int, folder: Path) -> dict[str, str]:
    """Settings that start every Python process of a worker `minutes` ahead."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(AHEAD.format(minutes=minutes))
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path}


def _log_clock(stack: FaultStack, name: str) -> datetime:
    """The latest time the process wrote in its log, as its own clock read it."""
    stamps = LOG_TIME.findall(stack.log(name))
    return datetime.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S")


def test_worker_ten_minutes_ahead_keeps_leases_on_the_database_clock(
    make_stack: Callable[..., FaultStack], tmp_path: Path
) -> None:
    # Each worker takes only the chunks delivered to it (no pulling ahead), so both get some:
    # otherwise the first to start may lease all 48 items before the other sees a message.
    stack = make_stack(env={"GEMMA_BATCH_MERGE_ITEMS": "0"}, workers=1)
    stack.start_worker("ahead", env=_ahead(SKEW_MINUTES, tmp_path / "ahead"))
    ahead = _log_clock(stack, "ahead") - datetime.now()
    assert ahead.total_seconds() > (SKEW_MINUTES - 1) * 60, f"the clock is not ahead: {ahead}"
    (child,) = stack.pool_children("ahead")
    mine = f"/{child.pid}"

    job_id = stack.api.submit(prompts(TOTAL, sleep=0.3))["id"]

    def ahead_has_run_some() -> bool:
        rows = stack.store.items(job_id)
        done = [r for r in rows if r.status == "completed" and (r.worker or "").endswith(mine)]
        return len(done) >= 4

    wait_for(ahead_has_run_some, 90, lambda: stack.describe(job_id))
    # Both workers ran items side by side, each its own: nothing was taken over early.
    assert "re-enqueueing" not in stack.log("api")
    assert all(row.attempts <= 1 for row in stack.store.items(job_id))
    stack.kill_worker("ahead")
    held = {  # its leases (renewed every second) outlive these few milliseconds
        row.index
        for row in stack.store.items(job_id)
        if row.status == "pending" and (row.worker or "").endswith(mine)
    }

    # The lease is 3 s on the database's clock: the other worker finishes the job soon after,
    # not 10 minutes on (when a lease reckoned on the dead worker's clock would end).
    stack.wait_job(job_id, timeout=90)
    rows = stack.check_each_item_once(job_id, TOTAL, completed=TOTAL)
    twice = {row.index for row in rows if row.attempts > 1}
    assert twice <= held, f"items run twice that the killed worker did not hold: {twice - held}"
    assert all(row.attempts <= 2 for row in rows)
