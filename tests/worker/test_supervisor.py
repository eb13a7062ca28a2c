"""`gemma-batch worker --gpus`: a pinned child per GPU, replaced when it dies, stopped on SIGTERM.

There is no GPU here: the ids are fake and `--device cpu` overrides the device; the pinning is
read from each child's environment.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import TINY


def _workers(supervisor: psutil.Process) -> dict[str, int]:
    """CUDA_VISIBLE_DEVICES -> pid of each Celery worker the supervisor runs."""
    found = {}
    for child in supervisor.children():
        try:
            env = child.environ()
        except psutil.NoSuchProcess:
            continue
        if "CUDA_VISIBLE_DEVICES" in env:
            found[env["CUDA_VISIBLE_DEVICES"]] = child.pid
    return found


def _wait_for(check, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_supervisor_pins_replaces_and_stops(model_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "gemma_batch", "worker", "--gpus", "0,1", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    env |= {"GEMMA_BATCH_MODEL": TINY}
    log = (tmp_path / "supervisor.log").open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    supervisor = psutil.Process(process.pid)
    try:
        first = _wait_for(lambda: (w := _workers(supervisor)) and len(w) == 2 and w)
        assert set(first) == {"0", "1"}
        for pid in first.values():
            child_env = psutil.Process(pid).environ()
            assert child_env["GEMMA_BATCH_DEVICE"] == "cpu"
            assert child_env["GEMMA_BATCH_MODEL"] == TINY
            assert child_env["GOMP_SPINCOUNT"] == "20000"  # OpenMP spins briefly in workers
        hostnames = {" ".join(psutil.Process(pid).cmdline()) for pid in first.values()}
        assert any("gpu0@" in line for line in hostnames) and any(
            "gpu1@" in line for line in hostnames
        )

        os.kill(first["1"], signal.SIGKILL)
        replaced = _wait_for(
            lambda: (w := _workers(supervisor)).get("1") not in (None, first["1"]) and w
        )
        assert replaced["0"] == first["0"]
        logged = tmp_path / "supervisor.log"
        assert "exited with -9; starting it again" in logged.read_text()
        # The replacement is up (Celery logs "gpu1@host ready.") before the stop.
        _wait_for(
            lambda: re.search(r"gpu1@\S+ ready\.", logged.read_text().split("exited with -9")[1])
        )

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        for pid in replaced.values():
            assert (
                not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            )
    finally:
        if process.poll() is None:
            for child in supervisor.children(recursive=True):
                child.kill()
            process.kill()
