"""How long a test waits for a state before it calls the state lost: one bound for the whole suite.

Tests wait for states (a metric, a log line, a held render, a node's view), never for durations, so this
is no measure of speed: only how long a test goes on looking. It is generous because a busy machine (load
20 on two cores) makes a render or a process start-up ten times slower than on an idle one; a test that
passes waits only as long as the state takes. `TESTS_PATIENCE` (seconds) sets it for slower machines still.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

PATIENCE = float(os.environ.get("TESTS_PATIENCE", "120"))


def until(what: str, check: Callable[[], bool], deadline: float = PATIENCE) -> None:
    """Poll `check` until it holds; TimeoutError naming `what` once `deadline` seconds have passed."""
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            raise TimeoutError(f"not within {deadline:g} s: {what}")
        time.sleep(0.05)
