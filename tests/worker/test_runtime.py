"""The worker process's model load leaves no OpenMP threads behind (worker.runtime.load_engine)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# In a fresh process: libgomp keeps a team of threads for each thread that has run parallel
# work, for as long as that thread lives. The load's parallel work stands in for a model's.
PROBE = textwrap.dedent(
    """
    import os, threading, time
    import torch
    from worker import runtime

    torch.set_num_threads(2)

    def others():  # threads that are not Python's: OpenMP's
        return len(os.listdir("/proc/self/task")) - threading.active_count()

    def parallel_work():
        torch.ones(2**24).mul_(2)

    runtime._load_engine = parallel_work
    before = others()
    runtime.load_engine()
    deadline = time.monotonic() + 10  # a released team's threads exit on their own
    while others() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    after_load = others()
    parallel_work()  # on this thread, which lives on: its team stays
    print(before, after_load, others())
    """
)


def test_the_load_leaves_no_openmp_threads_behind() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    before, after_load, after_work_here = map(int, done.stdout.split())
    assert after_load == before
    # The same work on a thread that lives on keeps its team: the count above can see one.
    assert after_work_here == before + 1
