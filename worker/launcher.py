"""`gemma-batch worker`: one Celery worker process per GPU, each pinned before torch loads."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from types import FrameType

from gemma_batch.model_cache import get_prepared
from gemma_batch.queue import queue_name
from gemma_batch.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    hostname: str
    env: dict[str, str]


def plan_workers(
    settings: Settings, gpus: list[str] | None, device: str | None
) -> list[WorkerSpec]:
    """One spec per process: a GPU id each, or a single worker on `device` (default: settings)."""
    base = {"GEMMA_BATCH_MODEL": settings.model}
    if gpus:
        # CUDA_VISIBLE_DEVICES is read when CUDA initialises, so it is set in the child's
        # environment before the child ever imports torch: each child sees one GPU as cuda:0.
        return [
            WorkerSpec(
                f"gpu{gpu}@%h",
                base | {"CUDA_VISIBLE_DEVICES": gpu, "GEMMA_BATCH_DEVICE": device or "cuda"},
            )
            for gpu in gpus
        ]
    chosen = device or settings.device
    return [WorkerSpec(f"{chosen}@%h", base | {"GEMMA_BATCH_DEVICE": chosen})]


def celery_command(spec: WorkerSpec, settings: Settings, loglevel: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "worker.tasks", "worker",
        "--pool", "prefork", "--concurrency", "1",
        "--hostname", spec.hostname,
        "--queues", queue_name(settings.model),
        "--loglevel", loglevel,
    ]  # fmt: skip


def run_workers(
    settings: Settings, gpus: list[str] | None, device: str | None, loglevel: str
) -> int:
    """Start the workers and wait; SIGTERM/SIGINT is passed on so each finishes its task."""
    get_prepared(settings.model_dir, settings.model)  # fail here, clearly, not in every child
    specs = plan_workers(settings, gpus, device)
    children = [
        subprocess.Popen(celery_command(spec, settings, loglevel), env=os.environ | spec.env)
        for spec in specs
    ]
    for spec, child in zip(specs, children, strict=True):
        log.info("started worker %s (pid %s, %s)", spec.hostname, child.pid, spec.env)

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)
