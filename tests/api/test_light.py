"""The API process stays light: importing it must not pull in torch or transformers."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_api_leaves_torch_out() -> None:
    code = (
        "import sys, api.main\n"
        "heavy = [m for m in ('torch', 'transformers', 'bitsandbytes') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
