"""A step gate for server processes the tests start (`tests.processes.StepGate`): Python imports this module
at start-up when its folder is on PYTHONPATH, and it wraps the engines' per-step hook so that a test can
pause renders between two steps, or make every step last at least a given time, whatever the machine's
speed. Driven by files in the folder named by STEP_GATE_DIR:

    hold          while it exists, a render that has done at least N steps (N: the file's text, default 1)
                  waits before its next step; it still stops when its request is cancelled
    paused        one line ("done/total") appended each time a render starts waiting
    step-seconds  each step also sleeps this long
    collect       while it exists, each step first collects garbage: asyncio reports an exception nobody read
                  when its future is collected, which a reference cycle can otherwise put off indefinitely

The render itself is untouched: real models, real threads, real callbacks.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

_folder = os.environ.get("STEP_GATE_DIR")


def _install(folder: Path) -> None:
    from engines import progress

    original = progress.StepHook.__call__

    def gated(self: progress.StepHook, done: int, total: int, first_image: int, denoised: object) -> None:
        if (folder / "collect").exists():
            gc.collect()
        slow = folder / "step-seconds"
        if slow.exists():
            time.sleep(float(slow.read_text() or 0))
        announced = False
        while (hold := folder / "hold").exists() and done >= int(_text(hold) or 1):
            if not announced:
                with open(folder / "paused", "a") as paused:
                    paused.write(f"{done}/{total}\n")
                announced = True
            if self.on_step is not None:  # a cancelled request raises here, as at any step
                progress._report(lambda: self.on_step(done, total))
            time.sleep(0.02)
        original(self, done, total, first_image, denoised)

    progress.StepHook.__call__ = gated


def _text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:  # released between the check and the read
        return "0"


if _folder:
    _install(Path(_folder))
