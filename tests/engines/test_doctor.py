"""`python -m engines doctor` on this GPU-less host: fast, plain about what it checked, honest exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort

from engines.backends import openvino

ROOT = Path(__file__).resolve().parents[2]
Model = Callable[[str], Path]


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engines", "doctor", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_doctor_without_a_gpu_says_so_and_passes() -> None:
    done = _doctor("--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is True and report["seconds"] < 30
    assert checks["provider cpu"]["status"] == "ok"
    built = ort.get_available_providers()
    assert (checks["provider cuda"]["status"] == "absent") == ("CUDAExecutionProvider" not in built)
    assert checks["gpu"]["status"] == "absent" and "no NVIDIA GPU" in checks["gpu"]["detail"]
    if openvino.available():  # the version, the processor and the precision auto picks, with the reason
        precision, why = openvino.choose_precision("auto")
        assert checks["openvino"]["status"] == "ok" and f": {precision} ({why})" in checks["openvino"]["detail"]
    else:
        assert checks["openvino"]["status"] == "absent"
    text = _doctor()
    assert text.returncode == 0 and "no NVIDIA GPU here" in text.stdout
    assert text.stdout.strip().splitlines()[-1].startswith("everything found works")


def test_doctor_renders_a_model_on_the_cpu(tiny_model: Model) -> None:
    done = _doctor(str(tiny_model("tiny-sd15")), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["model"]["status"] == "ok" and checks["tensorrt plans"]["status"] == "absent"
    assert checks["render cpu"]["status"] == "ok" and "finite" in checks["render cpu"]["detail"]
    if openvino.available():  # compared with the CPU's render
        rendered = checks["render openvino"]
        assert rendered["status"] == "ok" and "difference to CPU" in rendered["detail"]


def test_doctor_exits_1_on_a_problem(tmp_path: Path) -> None:
    done = _doctor(str(tmp_path / "no-model"))
    assert done.returncode == 1
    assert "problem  model" in done.stdout and "fix: re-export it" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("problems found")
