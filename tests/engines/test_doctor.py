"""`python -m engines doctor` on this GPU-less host: fast, plain about what it checked, honest exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import pytest

from engines import doctor, libraries, plans
from engines import manifest as mf
from engines.backends import openvino
from tests.engines.test_tensorrt_plans import _copy, _fake_plans, _list
from tests.patience import PATIENCE

ROOT = Path(__file__).resolve().parents[2]
Model = Callable[[str], Path]


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engines", "doctor", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=2 * PATIENCE)


def test_doctor_without_a_gpu_says_so_and_passes() -> None:
    done = _doctor("--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    # fast: about a second on an idle machine, so a check that waited on absent hardware would show
    assert report["ok"] is True and report["seconds"] < PATIENCE / 2
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
        assert rendered["status"] == "ok" and "on OpenVINO [CPU, " in rendered["detail"]


def test_doctor_exits_1_on_a_problem(tmp_path: Path) -> None:
    done = _doctor(str(tmp_path / "no-model"))
    assert done.returncode == 1
    assert "problem  model" in done.stdout and "fix: re-export it" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("problems found")


# -- the TensorRT stack: ONNX Runtime's EP links TensorRT 10, the native backend runs TensorRT 11 --------

# The supported GPU install (`.[gpu,tensorrt]`) as the facts a GPU host gives: onnxruntime-gpu 1.31.1's
# libonnxruntime_providers_tensorrt.so needs libnvinfer.so.10 (its DT_NEEDED), the tensorrt extra is 11.4.
NATIVE_11 = libraries.TensorRtStack(linked_major=10, tensorrt="11.4.0.106", cuda_python="13.4.4")
EP_UNAVAILABLE = "TensorRT EP unavailable: links TensorRT 10, TensorRT 11 installed"


def test_tensorrt_ep_beside_tensorrt_11_is_absent_not_a_problem() -> None:
    """The supported pair (native TensorRT 11 for plans) must not fail the doctor, and with it the GPU
    workflow: the EP line says why it is unavailable, as absent; the tensorrt line is ok and says it too."""
    report = doctor.run(stack=NATIVE_11)
    checks = {c.name: c for c in report.checks}
    assert checks["provider tensorrt-ep"].status == "absent"
    assert checks["provider tensorrt-ep"].detail == EP_UNAVAILABLE
    assert "sdserve[gpu,tensorrt-ep]" in checks["provider tensorrt-ep"].fix
    assert checks["tensorrt"].status == "ok" and EP_UNAVAILABLE in checks["tensorrt"].detail
    assert report.ok is True  # the CLI's exit status 0 (test_doctor_exits_1_on_a_problem covers the mapping)
    assert doctor.text(report).splitlines()[-1].startswith("everything found works")
    (ep_line,) = [line for line in doctor.summary(report).splitlines() if line.startswith("tensorrt-ep ")]
    assert ep_line.split()[1] == "absent" and ep_line.endswith(EP_UNAVAILABLE)


@pytest.mark.parametrize(("stack", "status"), [
    (libraries.TensorRtStack(10, "10.16.1.11"), "ok"),  # the tensorrt-ep extra: the EP's TensorRT, no cuda-python
    (libraries.TensorRtStack(10, "11.4.0.106"), "problem"),  # TensorRT 11 without cuda-python: nothing can use it
    (libraries.TensorRtStack(None, "11.4.0.106", cuda_python="13.4.4"), "ok"),  # the CPU onnxruntime beside it
    (libraries.TensorRtStack(10, None, "TensorRT is installed but cannot load: OSError: x"), "problem"),
])
def test_the_tensorrt_line_follows_what_can_use_it(stack: libraries.TensorRtStack, status: str) -> None:
    assert doctor.tensorrt(stack).status == status
    if stack.linked_major is not None and stack.tensorrt_major != 10:
        assert doctor.tensorrt_ep(stack).status == "absent"


def test_summary_is_one_line_per_backend_saying_where_each_component_ran(tiny_model: Model) -> None:
    done = _doctor(str(tiny_model("tiny-sd15")), "--summary")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["cpu", "cuda", "tensorrt-ep", "tensorrt"]
    cpu = lines[0].split(None, 2)
    assert cpu[1] == "ok" and "text_encoder, unet, vae_decoder on ONNX Runtime [CPU]" in cpu[2]
    assert all(line.split()[1] == "absent" for line in lines[1:])  # no GPU, no TensorRT here


def test_doctor_renders_at_a_size_the_plans_cover(tiny_model: Model, tmp_path: Path) -> None:
    """Plans built for 128x128 only: rendering at the model's smallest size (64) would pass "render
    tensorrt" on the ONNX Runtime fallback; every backend renders at the plans' size instead."""
    root = _copy(tiny_model, "tiny-sd15", tmp_path)
    manifest = mf.read(root)
    _list(root, _fake_plans(root, manifest, plans.make_profiles(manifest, sizes=[(128, 128)])))
    done = _doctor(str(root), "--json")
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["tensorrt plans"]["status"] == "problem"  # no TensorRT here; the size still follows the plans
    assert checks["render cpu"]["status"] == "ok" and checks["render cpu"]["detail"].startswith("128x128, 2 steps")
    assert doctor.render_size(manifest, None) == (manifest.sizes.min, manifest.sizes.min)


def _ep_beside_another_tensorrt() -> bool:
    if libraries.linked_tensorrt_major() is None:  # the CPU onnxruntime: nothing to import
        return False
    stack = libraries.tensorrt_stack()
    return stack.tensorrt is not None and stack.tensorrt_major != stack.linked_major


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not _ep_beside_another_tensorrt(),
                    reason="needs onnxruntime-gpu beside a TensorRT of another major (the .[gpu,tensorrt] install)")
def test_doctor_passes_on_the_supported_gpu_install() -> None:
    """On the GPU runner's .[gpu,tensorrt] install: exit status 0, the EP absent with the reason."""
    done = _doctor("--json")
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["provider tensorrt-ep"]["status"] == "absent"
    assert checks["provider tensorrt-ep"]["detail"].startswith("TensorRT EP unavailable: links TensorRT")
    assert done.returncode == 0, done.stdout
