"""Faults inside ONNX Runtime for the server processes a test starts (`sitecustomize.py` here says how), and
waiting for the states they lead to."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

FOLDER = Path(__file__).parent
DEADLINE = 60.0


def environment(faults: Path) -> dict[str, str]:
    """What a server process needs in its environment to obey the files in `faults`. The source tree comes
    right after: `sitecustomize` imports `engines` before the server's own folder is on the path. The faults live
    in ONNX Runtime, so the process renders on it (`auto` would take OpenVINO where it is installed)."""
    return {"SDSERVE_TEST_FAULTS": str(faults), "SDSERVE_BACKEND": "cpu",
            "PYTHONPATH": os.pathsep.join([str(FOLDER), str(FOLDER.parents[1])])}


def until(what: str, check: Callable[[], bool], deadline: float = DEADLINE) -> None:
    """Poll `check` until it holds (a state, never a duration: the deadline is only a bound)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"not within {deadline:g} s: {what}")


class StepGate:
    """Holds the renders of the server processes started with `env` between two steps (`sitecustomize.py`),
    so that a test can act while a render is known to be running."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        return environment(self.folder)

    def hold(self, after_steps: int = 1) -> None:
        """Renders wait once they have done `after_steps` steps, until `release` (`held` starts afresh)."""
        (self.folder / "held").unlink(missing_ok=True)
        (self.folder / "hold").write_text(str(after_steps))

    def release(self) -> None:
        (self.folder / "hold").unlink(missing_ok=True)

    def slow(self, seconds: float) -> None:
        """Every step lasts at least `seconds` (0: as long as it takes)."""
        (self.folder / "step-seconds").write_text(str(seconds))

    def collect_garbage(self) -> None:
        """Each step first collects garbage, so that what a server leaves unreferenced is reported at once."""
        (self.folder / "collect").touch()

    def held(self) -> list[str]:
        """One "done/total" per render that has started waiting."""
        path = self.folder / "held"
        return path.read_text().split() if path.exists() else []

    def wait_held(self, count: int = 1) -> list[str]:
        until(f"{count} renders held", lambda: len(self.held()) >= count, deadline=120)
        return self.held()
