"""`gemma-batch config`, `model list` and the worker plan, as a user runs them."""

from __future__ import annotations

import os
import subprocess

import pytest

from gemma_batch.settings import Settings
from tests.conftest import run_cli
from worker.launcher import OPENMP_SPIN, celery_command, child_env, plan_workers


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=dict(os.environ) | env)


def test_config_prints_settings_with_secrets_masked() -> None:
    out = _cli(
        "config",
        GEMMA_BATCH_DATABASE_URL="postgresql://app:hunter2@db:5432/gemma",
        GEMMA_BATCH_BROKER_URL="redis://:s3cret@redis:6379/0",
        GEMMA_BATCH_HF_TOKEN="hf_abcdef",
        GEMMA_BATCH_CHUNK_SIZE="17",
    )
    assert out.returncode == 0, out.stderr
    for secret in ("hunter2", "s3cret", "hf_abcdef"):
        assert secret not in out.stdout
    assert "postgresql://app:***@db:5432/gemma" in out.stdout
    assert "GEMMA_BATCH_CHUNK_SIZE" in out.stdout and "17" in out.stdout


def test_bad_setting_is_a_readable_error() -> None:
    out = _cli("config", GEMMA_BATCH_QUANTIZATION="fp3")
    assert out.returncode == 1
    assert "quantization" in out.stderr and "Traceback" not in out.stderr


def test_worker_without_a_prepared_model_says_how_to_get_it() -> None:
    out = _cli("worker", "--model", "gemma-2b-it")
    assert out.returncode == 1
    assert "run `gemma-batch model prepare gemma-2b-it`" in out.stderr
    assert "Traceback" not in out.stderr


def test_one_pinned_worker_per_gpu() -> None:
    settings = Settings(model="gemma-2b-it")
    specs = plan_workers(settings, ["0", "1"], None)
    assert [s.hostname for s in specs] == ["gpu0@%h", "gpu1@%h"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0", "1"]
    assert all(s.env["GEMMA_BATCH_DEVICE"] == "cuda" for s in specs)
    command = celery_command(specs[0], settings, "INFO")
    assert command[command.index("--queues") + 1] == "gemma-batch.gemma-2b-it"
    assert command[command.index("--pool") + 1] == "prefork"

    (cpu,) = plan_workers(settings, None, "cpu")
    assert cpu.hostname == "cpu@%h" and "CUDA_VISIBLE_DEVICES" not in cpu.env


def test_workers_spin_briefly_unless_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    (cpu,) = plan_workers(Settings(model="gemma-2b-it"), None, "cpu")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert child_env(cpu)["GOMP_SPINCOUNT"] == OPENMP_SPIN == "20000"
    assert child_env(cpu)["GEMMA_BATCH_DEVICE"] == "cpu"
    monkeypatch.setenv("GOMP_SPINCOUNT", "50000")
    assert child_env(cpu)["GOMP_SPINCOUNT"] == "50000"
