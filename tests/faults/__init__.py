"""Faults inside ONNX Runtime for the server processes a test starts (`sitecustomize.py` here says how), and
waiting for the states they lead to."""

from __future__ import annotations

import os
from pathlib import Path

from tests.patience import until

FOLDER = Path(__file__).parent


def environment(faults: Path, onnxruntime: bool = True) -> dict[str, str]:
    """What a server process needs in its environment to obey the files in `faults`. The source tree comes
    right after: `sitecustomize` imports `engines` before the server's own folder is on the path. The faults live
    in ONNX Runtime, so the process renders on it (`auto` would take OpenVINO where it is installed); holds
    between steps (`StepGate`) work on any backend (`onnxruntime=False` leaves the choice to the server)."""
    env = {"SDSERVE_TEST_FAULTS": str(faults), "PYTHONPATH": os.pathsep.join([str(FOLDER), str(FOLDER.parents[1])])}
    return {**env, "SDSERVE_BACKEND": "cpu"} if onnxruntime else env


class StepGate:
    """Holds the renders of the server processes started with `env` between two steps (`sitecustomize.py`),
    so that a test can act while a render is known to be running."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        return environment(self.folder, onnxruntime=False)

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
        until(f"{count} renders held", lambda: len(self.held()) >= count)
        return self.held()
