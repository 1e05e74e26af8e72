"""Faults inside ONNX Runtime for the server processes a test starts (`sitecustomize.py` here says how), and
waiting for the states they lead to."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

FOLDER = Path(__file__).parent
DEADLINE = 60.0


def environment(faults: Path) -> dict[str, str]:
    """What a server process needs in its environment for its ONNX Runtime to obey the files in `faults`."""
    return {"SDSERVE_TEST_FAULTS": str(faults), "PYTHONPATH": str(FOLDER)}


def until(what: str, check: Callable[[], bool], deadline: float = DEADLINE) -> None:
    """Poll `check` until it holds (a state, never a duration: the deadline is only a bound)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"not within {deadline:g} s: {what}")
