"""The GPU benchmark runs only where a GPU is lent, rarely: on the CPU it must still run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_runs_its_batch_one_modes_on_a_cpu(tmp_path: Path) -> None:
    # gemma-tiny's shapes; a budget of a second stops the sweeps after batch 1.
    out = tmp_path / "gpu.json"
    command = [sys.executable, "-m", "bench.gpu", "--archs", "gemma-tiny", "--precisions", "bf16"]
    subprocess.run(
        [*command, "--budget", "1", "--out", str(out)], cwd=ROOT, check=True, timeout=600
    )
    rows = json.loads(out.read_text())
    assert rows[0]["device"] == "cpu"
    measured = [row for row in rows if "tok_s" in row]
    assert [row["mode"] for row in measured] == ["batcher", "batcher-each-step", "eager", "static"]
    assert all(row["rows"] == 1 and row["tok_s"] > 0 for row in measured)
