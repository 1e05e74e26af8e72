"""`python -m engines render`: writes the image, and shows its steps one per line where its output is not a
terminal (a pipe, a log file), never run together by carriage returns."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from tests.processes import ROOT


def test_render_writes_the_image_and_one_line_per_step(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    done = subprocess.run([sys.executable, "-m", "engines", "render", str(tiny_model("tiny-sd15")), "--prompt",
                           "a lighthouse", "--size", "64x64", "--steps", "3", "--seed", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, timeout=300)  # bytes: text mode would turn \r into \n
    errors = done.stderr.decode()
    assert done.returncode == 0, errors
    assert Image.open(out).size == (64, 64)
    assert "\r" not in errors
    steps = [line for line in errors.split("\n") if line.startswith("step ")]
    assert steps == ["step 1/3", "step 2/3", "step 3/3"], errors
    assert f"wrote {out}" in done.stdout.decode()
