"""`gemma-batch worker`: one Celery worker process per GPU, each pinned before torch loads."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

from gemma_batch.dispatch.queues import queue_name
from gemma_batch.errors import AppError
from gemma_batch.models.cache import get_prepared
from gemma_batch.settings import Settings
from worker.quantization import check_mode

log = logging.getLogger(__name__)

# A child that dies at once (a broken GPU) must not be restarted in a tight loop.
RESTART_PAUSE = 1.0
# How many times libgomp's idle threads spin waiting for the next parallel op before they sleep:
# about 0.2 ms, not its default of 300,000 (about 3 ms). A worker shares its cores with the API,
# Celery's consumer and its own writer, and a team that spins for milliseconds takes their CPU:
# on 2 cores, 200 one-item jobs submitted to a running worker lost less against one job of the
# same items (docs/benchmarks.md). Much shorter spins (200) slowed the engine alone. A
# GOMP_SPINCOUNT in the environment wins.
OPENMP_SPIN = "20000"


@dataclass(frozen=True)
class WorkerSpec:
    hostname: str
    env: dict[str, str]


def plan_workers(
    settings: Settings, gpus: list[str] | None, device: str | None
) -> list[WorkerSpec]:
    """One spec per process: a GPU id each, or a single worker on `device` (default: settings)."""
    base = {"GEMMA_BATCH_MODEL": settings.model}

    def metrics_port(slot: int) -> dict[str, str]:
        port = settings.worker_metrics_port
        return {"GEMMA_BATCH_WORKER_METRICS_PORT": str(port + slot if port else 0)}

    if gpus:
        # CUDA_VISIBLE_DEVICES is read when CUDA initialises, so it is set in the child's
        # environment before the child ever imports torch: each child sees one GPU as cuda:0.
        return [
            WorkerSpec(
                f"gpu{gpu}@%h",
                base
                | metrics_port(slot)
                | {"CUDA_VISIBLE_DEVICES": gpu, "GEMMA_BATCH_DEVICE": device or "cuda"},
            )
            for slot, gpu in enumerate(gpus)
        ]
    chosen = device or settings.device
    return [WorkerSpec(f"{chosen}@%h", base | metrics_port(0) | {"GEMMA_BATCH_DEVICE": chosen})]


def child_env(spec: WorkerSpec) -> dict[str, str]:
    """A worker process's environment: the short OpenMP spin unless this one sets its own, this
    one's, then the spec's pinning and settings."""
    return {"GOMP_SPINCOUNT": OPENMP_SPIN} | dict(os.environ) | spec.env


def celery_command(spec: WorkerSpec, settings: Settings, loglevel: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "worker.tasks", "worker",
        "--pool", "prefork", "--concurrency", "1",
        "--hostname", spec.hostname,
        "--queues", queue_name(settings.model),
        "--loglevel", loglevel,
    ]  # fmt: skip


class Supervisor:
    """Keeps one worker process per spec alive: a child that dies is started again."""

    def __init__(self, specs: list[WorkerSpec], settings: Settings, loglevel: str) -> None:
        self.specs = specs
        self.settings = settings
        self.loglevel = loglevel
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def start(self, slot: int) -> None:
        spec = self.specs[slot]
        command = celery_command(spec, self.settings, self.loglevel)
        child = subprocess.Popen(command, env=child_env(spec))
        self.children[slot] = child
        log.info("started worker %s (pid %s, %s)", spec.hostname, child.pid, spec.env)

    def stop(self, signum: int, _frame: FrameType | None = None) -> None:
        # Each Celery worker finishes its current task on SIGTERM (a warm shutdown).
        self.stopping = True
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signum)

    def run(self) -> int:
        for slot in range(len(self.specs)):
            self.start(slot)
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        while not self.stopping:
            for slot, child in list(self.children.items()):
                if child.poll() is not None and not self.stopping:
                    log.warning(
                        "worker %s exited with %s; starting it again",
                        self.specs[slot].hostname,
                        child.returncode,
                    )
                    time.sleep(RESTART_PAUSE)
                    self.start(slot)
            time.sleep(0.2)
        return max((child.wait() for child in self.children.values()), default=0)


def gpu_cards() -> dict[str, tuple[str, tuple[int, int]]]:
    """Each GPU's name and compute capability by id, as nvidia-smi reports them (no torch here:
    the supervisor never touches CUDA)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    cards = {}
    for line in out.splitlines():
        index, name, capability = (part.strip() for part in line.split(","))
        major, minor = capability.split(".")
        cards[index] = (name, (int(major), int(minor)))
    return cards


def check_quantization(settings: Settings, specs: list[WorkerSpec]) -> None:
    """Refuse a mode a worker's device cannot run now, before any worker starts or loads."""
    cards = gpu_cards()
    for spec in specs:
        device = spec.env["GEMMA_BATCH_DEVICE"]
        gpu = spec.env.get("CUDA_VISIBLE_DEVICES", "0")
        if device == "auto":
            device = "cuda" if cards else "cpu"
        check_mode(settings.quantization, device, cards.get(gpu) if device == "cuda" else None)


def run_workers(
    settings: Settings, gpus: list[str] | None, device: str | None, loglevel: str
) -> int:
    """Start the workers and keep them running until SIGTERM/SIGINT."""
    # Fail here, clearly, not in every child.
    prepared = get_prepared(settings.model_dir, settings.model)
    if prepared.base is not None:
        raise AppError(
            f"{settings.model} is an adapter of {prepared.base}: workers of {prepared.base} "
            "serve it; start those (--model " + prepared.base + ")"
        )
    if not prepared.has_weights:
        raise AppError(
            f"{settings.model} is prepared here without its weights (--tokenizer-only, for an "
            f"API machine); run `gemma-batch model prepare {settings.model}` to fetch them"
        )
    if gpus == ["all"]:
        gpus = list(gpu_cards())
        if not gpus:
            raise AppError("--gpus all: nvidia-smi found no GPU; use --device cpu")
    specs = plan_workers(settings, gpus, device)
    check_quantization(settings, specs)
    return Supervisor(specs, settings, loglevel).run()
