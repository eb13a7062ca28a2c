"""torchao quantization: what runs on a CPU, what is refused before loading, and the quality bar."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import worker.engine.loader as loader
from tests.conftest import REAL, TINY, run_cli
from worker.engine.loader import load_model
from worker.engine.quality import NEW_TOKENS, Figures, greedy_tokens, judge
from worker.quantization import UnsupportedQuantization, check_mode

CPU_MODES = ["int8-wo"]  # torchao's modes with CPU kernels (TORCHAO_KERNELS)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=240)


@pytest.mark.parametrize("mode", CPU_MODES)
@pytest.mark.parametrize("name", [TINY, pytest.param(REAL, marks=pytest.mark.real_model)])
def test_cpu_modes_load_quantized_and_generate(model_dir: Path, name: str, mode: str) -> None:
    model, tokenizer = load_model(model_dir / name, mode, "cpu")
    kinds = {type(m.weight).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert "Int8Tensor" in kinds  # the layers really are torchao tensors, not fp32 copies
    prompt = "The capital of France is Paris. The capital of Germany is"
    [tokens] = greedy_tokens(model, tokenizer, [prompt])
    assert len(tokens) == NEW_TOKENS
    if name == REAL:
        assert "Berlin" in tokenizer.decode(tokens)


@pytest.mark.parametrize("mode", ["int4-wo", "fp8"])
def test_modes_without_cpu_kernels_are_refused_before_loading(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    def no_loading(*_: object, **__: object) -> None:
        raise AssertionError("weights were loaded before the mode was checked")

    monkeypatch.setattr(loader.AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(UnsupportedQuantization) as refused:
        load_model(model_dir / TINY, mode, "cpu")
    assert f"quantization {mode} has no CPU kernels" in refused.value.message
    assert "this worker's device is cpu" in refused.value.message


@pytest.mark.parametrize(
    ("mode", "capability", "refused"),
    [("fp8", (8, 0), True), ("fp8", (9, 0), False), ("int4-wo", (7, 5), True),
     ("int4-wo", (8, 0), False), ("int8-wo", (7, 0), False)],
)  # fmt: skip
def test_cuda_modes_need_their_compute_capability(
    mode: str, capability: tuple[int, int], refused: bool
) -> None:
    card = ("NVIDIA Test Card", capability)  # no GPU here: the card is described, not queried
    if not refused:
        check_mode(mode, "cuda", card)
        return
    with pytest.raises(UnsupportedQuantization) as error:
        check_mode(mode, "cuda", card)
    have = f"{capability[0]}.{capability[1]}"
    assert f"quantization {mode} needs a CUDA GPU" in error.value.message
    assert f"NVIDIA Test Card (compute capability {have})" in error.value.message


def test_the_worker_command_refuses_a_mode_before_starting(tmp_path: Path) -> None:
    env = os.environ | {"GEMMA_BATCH_QUANTIZATION": "fp8", "GEMMA_BATCH_MODEL": TINY}
    started = subprocess.run(
        [sys.executable, "-m", "gemma_batch", "worker", "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 1
    assert "quantization fp8 has no CPU kernels; this worker's device is cpu" in started.stderr
    assert "Traceback" not in started.stderr and "started worker" not in started.stderr


def test_the_bar_fails_on_perplexity_or_a_lost_label() -> None:
    base = Figures(10.0, 30, 32, [[1, 2, 3, 4]] * 2)
    assert judge(base, Figures(10.19, 30, 32, [[1, 2, 3, 4], [1, 2, 9, 4]])).passes
    assert not judge(base, Figures(10.21, 30, 32, base.greedy)).passes
    assert not judge(base, Figures(10.0, 29, 32, base.greedy)).passes
    verdict = judge(base, Figures(10.0, 30, 32, [[1, 2, 3, 4], [1, 2, 9, 4]]))
    assert (verdict.identical, verdict.mean_prefix) == (0.5, 3.0)


def test_check_quant_of_none_against_none_agrees_exactly(model_dir: Path) -> None:
    out = _cli("model", "check-quant", TINY, "--mode", "none", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    lines = {line.split("│")[1].strip(): line for line in out.stdout.splitlines() if "│" in line}
    assert "+0.00%" in lines["perplexity"]
    assert "+0 " in lines["label accuracy"]
    assert "1.000" in lines["greedy 16 tokens identical"]
    assert "16.00" in lines["greedy agreeing prefix (mean)"]
    assert "none passes the bar" in out.stdout
    assert "perplexity (none)" in out.stderr  # progress, step by step


def test_check_quant_runs_int8_wo_and_prints_every_measure(model_dir: Path) -> None:
    out = _cli("model", "check-quant", TINY, "--mode", "int8-wo", "--device", "cpu")
    assert out.returncode in (0, 1), out.stderr
    for measure in ("perplexity", "label accuracy", "greedy 16 tokens identical"):
        assert measure in out.stdout
    assert ("passes the bar" in out.stdout) == (out.returncode == 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("no-such-model", "--mode", "int8-wo"), "unknown model 'no-such-model'"),
        ((TINY, "--mode", "fp8", "--device", "cpu"), "quantization fp8 has no CPU kernels"),
        ((TINY, "--mode", "fp4"), "unknown quantization 'fp4'"),
    ],
)
def test_check_quant_errors_are_one_line_without_a_traceback(
    model_dir: Path, args: tuple[str, ...], message: str
) -> None:
    out = _cli("model", "check-quant", *args)
    assert out.returncode == 1
    assert message in " ".join(out.stderr.split())
    assert "Traceback" not in out.stderr
