"""`gemma-batch model prepare --tokenizer-only`: an API machine keeps a model's config and
tokenizer, no weights, and still checks every prompt's tokens; a worker refuses such a folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import RUN, TINY, run_cli
from tests.tiny_model import CONTEXT

NAME = f"tokenizer-only-{RUN}"


@pytest.fixture(scope="module")
def light(model_dir: Path) -> Path:
    out = run_cli("model", "prepare", str(model_dir / TINY), "--name", NAME, "--tokenizer-only")
    assert out.returncode == 0, out.stderr
    assert f"prepared {NAME} (tokenizer only)" in out.stdout
    return model_dir / NAME


def test_folder_has_config_and_tokenizer_only(light: Path, model_dir: Path) -> None:
    kept = sorted(path.name for path in light.iterdir())
    assert "config.json" in kept and "tokenizer.json" in kept
    assert not list(light.glob("*.safetensors")) and list((model_dir / TINY).glob("*.safetensors"))
    listed = run_cli("model", "list").stdout
    row = next(row for row in listed.splitlines() if f" {NAME} " in row)
    assert [cell.strip() for cell in row.strip("│ ").split("│")][2] == "tokenizer only"


def test_api_counts_tokens_without_weights(light: Path, client: TestClient) -> None:
    accepted = client.post("/v1/jobs", json={"model": NAME, "items": [{"prompt": "short"}]})
    assert accepted.status_code == 202, accepted.text
    too_long = {"model": NAME, "items": [{"prompt": "word " * (CONTEXT + 10)}]}
    refused = client.post("/v1/jobs", json=too_long)
    assert refused.status_code == 422
    assert f"{NAME}'s context of {CONTEXT} tokens" in refused.json()["error"]["message"]


def test_worker_refuses_it_and_a_whole_prepare_fills_it_in(light: Path, model_dir: Path) -> None:
    worker = run_cli("worker", "--model", NAME, "--device", "cpu")
    assert worker.returncode == 1
    assert "prepared here without its weights (--tokenizer-only" in worker.stderr
    assert "Traceback" not in worker.stderr
    whole = run_cli("model", "prepare", str(model_dir / TINY), "--name", NAME)
    assert whole.returncode == 0, whole.stderr
    assert list(light.glob("*.safetensors"))
