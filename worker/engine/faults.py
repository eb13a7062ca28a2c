"""Deliberate misbehaviour for the fault-injection tests (setting fault_injection, off by default).

A micro-batch holding a prompt with `@@raise@@` raises, with `@@kill@@` kills its own worker
process outright, with `@@sleep=N@@` first sleeps N seconds: the failures the worker must
survive, on demand.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterable

SLEEP = re.compile(r"@@sleep=([0-9.]+)@@")


def inject(texts: Iterable[str]) -> None:
    texts = list(texts)
    pause = sum(float(match) for text in texts for match in SLEEP.findall(text))
    if pause:
        time.sleep(pause)
    if any("@@kill@@" in text for text in texts):
        os.kill(os.getpid(), signal.SIGKILL)
    if any("@@raise@@" in text for text in texts):
        raise RuntimeError("injected fault")
