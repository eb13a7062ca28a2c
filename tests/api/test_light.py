"""The API process stays light: importing it must not pull in torch or its kin.

The worker's Celery parent process neither: CUDA must first be touched in the forked child.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "bitsandbytes", "xgrammar", "peft")


@pytest.mark.parametrize("module", ["api.main", "worker.tasks", "gemma_batch.cli"])
def test_importing_leaves_the_model_stack_out(module: str) -> None:
    code = f"import sys, {module}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
