"""`gemma-batch model prepare DIR --adapter-of BASE`: an adapter that fits is registered and
listed; one that does not is refused with a clear message, and nothing is registered."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.adapters import random_lora
from tests.conftest import REAL, RUN, TINY, run_cli


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args)


@pytest.fixture(scope="module")
def tiny_adapter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter of the tiny model, as PEFT saves it."""
    out = tmp_path_factory.mktemp("adapter") / "tiny-lora"
    return random_lora(model_dir / TINY, out, ["q_proj", "v_proj"], seed=1)


def _variant(source: Path, tmp_path: Path, **config: object) -> Path:
    """A copy of the adapter with its config changed."""
    folder = tmp_path / "variant"
    shutil.copytree(source, folder)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | config))
    return folder


def _nothing_registered(model_dir: Path, name: str) -> bool:
    leftovers = [p.name for p in model_dir.iterdir() if p.name.startswith(f".{name}-")]
    return not (model_dir / name).exists() and not leftovers


def test_adapter_is_registered_and_listed(model_dir: Path, tiny_adapter: Path) -> None:
    name = f"tiny-tuned-{RUN}"
    out = _cli("model", "prepare", str(tiny_adapter), "--adapter-of", TINY, "--name", name)
    assert out.returncode == 0, out.stderr
    assert f"prepared {name} (adapter of {TINY})" in out.stdout
    assert sorted(p.name for p in (model_dir / name).iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapter_of.json",
    ]
    listed = _cli("model", "list")
    row = next(row for row in listed.stdout.splitlines() if f" {name} " in row)
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert cells == [name, "local", "yes", TINY]  # the last column: "adapter of"
    again = _cli("model", "prepare", str(tiny_adapter), "--adapter-of", TINY, "--name", name)
    assert again.returncode == 1 and "--force replaces it" in again.stderr


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("another base", "does not fit this base model"),
        ("unknown target module", "does not fit this base model"),
        ("rank unlike the weights", "does not fit this base model"),
        ("no weights file", "has no adapter_model.safetensors"),
        ("DoRA", "DoRA adapters cannot share a batch"),
        ("base not prepared", "the base model 'gemma-2b' is not prepared here"),
        ("adapter of an adapter", "is not prepared here"),
    ],
)
def test_bad_adapter_is_refused_and_nothing_registered(
    case: str, message: str, model_dir: Path, tiny_adapter: Path, tmp_path: Path
) -> None:
    source, base = tiny_adapter, TINY
    if case == "another base":
        base = REAL  # the tiny model's shapes are not the 270M's
    elif case == "unknown target module":
        source = _variant(tiny_adapter, tmp_path, target_modules=["qkv_fused"])
    elif case == "rank unlike the weights":
        source = _variant(tiny_adapter, tmp_path, r=16)
    elif case == "no weights file":
        source = _variant(tiny_adapter, tmp_path)
        (source / "adapter_model.safetensors").unlink()
    elif case == "DoRA":
        source = _variant(tiny_adapter, tmp_path, use_dora=True)
    elif case == "base not prepared":
        base = "gemma-2b"
    else:
        registered = f"tiny-first-{RUN}"
        first = _cli(
            "model", "prepare", str(tiny_adapter), "--adapter-of", TINY, "--name", registered
        )
        assert first.returncode == 0, first.stderr
        base = registered
    name = f"bad-{RUN}"
    out = _cli("model", "prepare", str(source), "--adapter-of", base, "--name", name)
    assert out.returncode == 1, out.stdout
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert _nothing_registered(model_dir, name)
