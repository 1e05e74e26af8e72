"""`python -m engines doctor [MODEL_DIR] [--json]`: what works on this host, for a new GPU machine and
for bug reports (OpenVINO included: its version and the precision it computes in, and why).

Each check says ok, problem (with the fix) or absent (not installed and not needed, e.g. no GPU on a CPU
host, or ONNX Runtime's TensorRT EP beside a TensorRT of another major). Providers are tried by creating
a real one-node session, never trusted from `get_available_providers()`. With a model directory it also
checks the TensorRT plans against this GPU and renders a small image on every backend that loads, at a size
the plans cover (else the model's smallest), comparing each with the reference render (CUDA's where it
works, else the CPU's) and saying where each component really ran. `summary` boils a report down to one
line per backend, the block to paste into an issue.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np

from engines import gpu, libraries, plans
from engines import manifest as mf
from engines.backends.base import Session
from engines.backends.tensorrt import FALLBACK
from engines.errors import EngineError

Status = Literal["ok", "problem", "absent"]
# x + x over a float[1, 4]: the smallest graph every provider must run (opset 17, IR 8).
PROBE_GRAPH = (b'\x08\x08\x12\x07sdserve:F\n\x13\n\x01x\n\x01x\x12\x01y\x1a\x03add"\x03Add\x12\x05probeZ\x13\n\x01x'
               b'\x12\x0e\n\x0c\x08\x01\x12\x08\n\x02\x08\x01\n\x02\x08\x04b\x13\n\x01y\x12\x0e\n\x0c\x08\x01\x12\x08'
               b'\n\x02\x08\x01\n\x02\x08\x04B\x04\n\x00\x10\x11')
RENDER_TOLERANCE = 0.02  # mean |backend - CPU| of 0-1 pixels: fp16 rounding, not a different image
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt-ep": "TensorrtExecutionProvider"}
SUMMARY_BACKENDS = ("cpu", "cuda", "tensorrt-ep", "tensorrt")


class Check(msgspec.Struct):
    name: str
    status: Status
    detail: str
    fix: str | None = None


class Report(msgspec.Struct):
    ok: bool  # no problem found
    checks: list[Check]
    seconds: float


def run(model_dir: str | None = None, stack: libraries.TensorRtStack | None = None) -> Report:
    """Every check; `stack` (default: this environment's) says which TensorRT the EP links and which is here."""
    started = time.perf_counter()
    checks = [package(), provider("cpu"), provider("cuda"), openvino()]
    stack = stack or libraries.tensorrt_stack()  # after the cuda check: TensorRT loads beside CUDA's libraries
    checks += [tensorrt_ep(stack), cuda_libraries(), device(), tensorrt(stack)]
    if model_dir is not None:
        usable = [c.name.split(" ")[1] for c in checks if c.name.startswith("provider ") and c.status == "ok"]
        usable += ["openvino"] if any(c.name == "openvino" and c.status == "ok" for c in checks) else []
        checks += model(Path(model_dir), usable)
    return Report(ok=all(c.status != "problem" for c in checks), checks=checks,
                  seconds=round(time.perf_counter() - started, 2))


def package() -> Check:
    cpu, gpu_package = libraries.installed("onnxruntime"), libraries.installed("onnxruntime-gpu")
    if libraries.installed("onnxruntime-openvino"):  # it installs the module onnxruntime too
        return Check("onnxruntime package", "problem", "onnxruntime-openvino is installed: it overwrites onnxruntime's "
                     "files (sdserve's openvino backend uses the openvino package instead)",
                     "pip uninstall -y onnxruntime-openvino onnxruntime && pip install 'sdserve[cpu]'")
    if cpu and gpu_package:
        return Check("onnxruntime package", "problem", f"both onnxruntime {cpu} and onnxruntime-gpu {gpu_package} are "
                     "installed; they overwrite each other's files",
                     "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'sdserve[gpu]'")
    if gpu_package:
        return Check("onnxruntime package", "ok", f"onnxruntime-gpu {gpu_package}")
    if cpu:
        return Check("onnxruntime package", "ok", f"onnxruntime {cpu} (CPU only; GPUs need sdserve[gpu])")
    return Check("onnxruntime package", "problem", "no onnxruntime distribution found", "pip install 'sdserve[cpu]'")


def provider(name: str) -> Check:
    import onnxruntime as ort

    label = f"provider {name}"
    if PROVIDERS[name] not in ort.get_available_providers():
        return Check(label, "absent", "this onnxruntime build has no such provider")
    try:
        if name != "cpu":
            libraries.prepare(name)
        session = ort.InferenceSession(PROBE_GRAPH, providers=[PROVIDERS[name]], enable_fallback=0)
        result = session.run(None, {"x": np.ones((1, 4), np.float32)})[0]
    except Exception as exc:  # a failing provider says why in its exception
        return Check(label, "problem", f"cannot create a session: {_one_line(exc)}", _fix(name))
    if session.get_providers()[0] != PROVIDERS[name] or not np.array_equal(result, np.full((1, 4), 2, np.float32)):
        return Check(label, "problem", f"a session asked for {PROVIDERS[name]} runs on {session.get_providers()[0]}",
                     _fix(name))
    return Check(label, "ok", "a one-node graph runs on it")


def openvino() -> Check:
    """The openvino backend: its version, the processor, and the precision `auto` picks there and why."""
    from engines.backends import openvino as backend

    if not backend.available():
        return Check("openvino", "absent", "not installed: the CPU renders on ONNX Runtime in fp32 (pip install "
                     "openvino, or sdserve[cpu], for bf16 on processors with AVX-512 BF16 or AMX)")
    try:
        precision, why = backend.choose_precision("auto")
        detail = f"OpenVINO {libraries.installed('openvino')} on {backend.processor()}: {precision} ({why})"
    except Exception as exc:  # a broken install raises from its C++ core
        return Check("openvino", "problem", f"installed but not usable: {_one_line(exc)}",
                     "pip install --force-reinstall openvino")
    return Check("openvino", "ok", detail)
def tensorrt_ep(stack: libraries.TensorRtStack) -> Check:
    """ONNX Runtime's TensorRT EP: absent, not a problem, beside a TensorRT of another major (the supported
    setup: TensorRT 11 for the native backend, while onnxruntime-gpu's EP links TensorRT 10)."""
    reason = libraries.ep_unavailable(stack)
    if reason is None:
        return provider("tensorrt-ep")
    return Check("provider tensorrt-ep", "absent", reason, libraries.ep_fix(stack) if stack.linked_major else None)


def _fix(name: str) -> str:
    if name == "tensorrt-ep":
        return "install the TensorRT major that onnxruntime-gpu links (see the tensorrt check), or use backend cuda"
    return "install sdserve[gpu] on a host with an NVIDIA driver (R580+ for CUDA 13); see the cuda libraries check"


def cuda_libraries() -> Check:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return Check("cuda libraries", "absent", "not needed by this onnxruntime build")
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").is_file() else ""
    wanted = ("libcudart", "libcublas", "libcudnn")
    found = sorted({Path(line.split()[-1]).name for line in maps.splitlines()
                    if any(w in line for w in wanted) and line.split()[-1].startswith("/")})
    missing = [w for w in wanted if not any(f.startswith(w) for f in found)]
    if missing:
        loaded = ", ".join(found) or "none"
        return Check("cuda libraries", "problem", f"not loaded: {', '.join(missing)} (loaded: {loaded})",
                     "pip install 'sdserve[gpu]' (brings the nvidia-* wheels), or put CUDA 13 and cuDNN 9 on "
                     "LD_LIBRARY_PATH")
    return Check("cuda libraries", "ok", ", ".join(found))


def device() -> Check:
    smi = shutil.which("nvidia-smi")
    expected = libraries.installed("onnxruntime-gpu") is not None
    if smi is None:
        return Check("gpu", "problem" if expected else "absent",
                     "no NVIDIA GPU here: nvidia-smi is not on PATH (checked the packages and providers only)",
                     "install the NVIDIA driver" if expected else None)
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,compute_cap,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("gpu", "problem", f"nvidia-smi failed: {_one_line(exc)}", "check the NVIDIA driver")
    if not out:
        return Check("gpu", "problem" if expected else "absent", "nvidia-smi lists no GPU")
    return Check("gpu", "ok", "; ".join(line.replace(", ", " | ") for line in out.splitlines()) +
                 " (name | memory | compute capability | driver)")


def tensorrt(stack: libraries.TensorRtStack) -> Check:
    """The TensorRT package: the native backend's (with cuda-python), and what the EP makes of it."""
    cuda_python = stack.cuda_python
    if stack.error is not None:
        return Check("tensorrt", "problem", stack.error, "pip install --force-reinstall 'sdserve[tensorrt]'")
    if stack.tensorrt is None:
        linked_note = f"; onnxruntime-gpu's EP links TensorRT {stack.linked_major}" if stack.linked_major else ""
        return Check("tensorrt", "absent",
                     "TensorRT is not installed (the tensorrt and tensorrt-ep backends need it)" + linked_note)
    detail = f"TensorRT {stack.tensorrt}, cuda-python {cuda_python or 'not installed'}"
    ep_works = stack.linked_major is not None and libraries.ep_unavailable(stack) is None
    if stack.linked_major is not None:
        detail += (f"; matches onnxruntime-gpu's EP (TensorRT {stack.linked_major})" if ep_works
                   else f"; {libraries.ep_unavailable(stack)}")
    if cuda_python is None and not ep_works:  # installed, and nothing here can use it
        return Check("tensorrt", "problem", detail,
                     "pip install 'sdserve[tensorrt]' (the native backend needs cuda-python)")
    return Check("tensorrt", "ok", detail)


def model(root: Path, usable: list[str]) -> list[Check]:
    try:
        manifest = mf.read(root)
    except EngineError as exc:
        return [Check("model", "problem", str(exc), f"re-export it: python -m export PRESET --output {root} --force")]
    plans_check, plan_set = _plans(root, manifest)
    checks = [Check("model", "ok", f"{manifest.name} ({manifest.family}), components "
                    + ", ".join(f"{k} {c.precision}" for k, c in manifest.components.items())), plans_check]
    size = render_size(manifest, plan_set)
    backends = [*usable, *(["tensorrt"] if plans_check.status == "ok" else [])]
    judge = "cuda" if "cuda" in backends else "cpu"  # the reference: CUDA's fp32-accumulating kernels, else the CPU
    reference = None
    for backend in sorted(backends, key=lambda b: b != judge):
        if backend == "cpu" and judge != "cpu" and max(size) > manifest.sizes.min:
            checks.append(Check("render cpu", "absent", f"not rendered at {size[0]}x{size[1]} (minutes on a CPU); "
                                "the cuda render is the reference"))
            continue
        check, pixels = _render(root, backend, size, reference, judge)
        reference = pixels if backend == judge else reference
        checks.append(check)
    return checks


def render_size(manifest: mf.Manifest, plan_set: mf.PlanSet | None) -> tuple[int, int]:
    """(width, height) to render at: one the plans cover, so that "render tensorrt" runs on them (the
    first profile's opt size of the set for this GPU, else of the newest set); without plans the model's
    smallest size, the cheapest."""
    chosen = plan_set or (manifest.tensorrt[-1] if manifest.tensorrt else None)
    if chosen is None:
        return manifest.sizes.min, manifest.sizes.min
    return chosen.profiles[0].width[1], chosen.profiles[0].height[1]


def _plans(root: Path, manifest: mf.Manifest) -> tuple[Check, mf.PlanSet | None]:
    if not manifest.tensorrt:
        return Check("tensorrt plans", "absent", "none built (python -m export PRESET --tensorrt builds them)"), None
    try:
        found = gpu.probe()
        plan_set = plans.select(root, manifest, found.tensorrt_version, found.compute_capability)
    except EngineError as exc:
        return Check("tensorrt plans", "problem", str(exc),
                     f"python -m export {manifest.name} --tensorrt --output {root}"), None
    return Check("tensorrt plans", "ok", f"{plan_set.key} for {found.name}: "
                 + ", ".join(p.label for p in plan_set.profiles)), plan_set


def _render(root: Path, backend: str, size: tuple[int, int], reference: np.ndarray | None, judge: str
            ) -> tuple[Check, np.ndarray | None]:
    from engines.pipeline import load
    from engines.render import RenderRequest

    label, (width, height) = f"render {backend}", size
    try:
        pipe = load(root, backend=backend, verify=False)
        try:
            pixels = pipe.render(RenderRequest(prompt="a red cube on a table", width=width, height=height, steps=2,
                                               seed=0)).pixels
            ran, off_plan = _ran(pipe.sessions)
        finally:
            pipe.close()
    except EngineError as exc:
        return Check(label, "problem", _one_line(exc), "see the provider checks above"), None
    where = f"{width}x{height}, 2 steps; {ran}"
    if not np.isfinite(pixels).all():
        return Check(label, "problem", f"{where}: the image has NaN or infinite pixels (fp16 overflow?)",
                     "re-export with --precision fp32 or report it"), None
    if backend == "tensorrt" and off_plan:
        return Check(label, "problem", f"{where}: calls left the plans for ONNX Runtime",
                     "rebuild the plans for the sizes and batches you render (python -m export … --tensorrt)"), pixels
    if reference is None:
        return Check(label, "ok", f"{where}; finite"), pixels
    difference = float(np.abs(pixels - reference).mean())
    if difference > RENDER_TOLERANCE:
        return Check(label, "problem", f"{where}; differs from the {judge} render by {difference:.3g} on average "
                     f"(tolerance {RENDER_TOLERANCE})", "report it with this output"), pixels
    return Check(label, "ok", f"{where}; mean difference to {judge} {difference:.2g}"), pixels


def _ran(sessions: Mapping[str, Session]) -> tuple[str, bool]:
    """Where each component's calls ran ("text_encoder, unet on TensorRT plan; vae_decoder on fallback:
    ONNX Runtime [CUDA, CPU]"), and whether any call of a TensorRT session left its plans."""
    places: dict[str, list[str]] = {}
    for name, session in sessions.items():
        for place in session.ran_on:
            places.setdefault(place, []).append(name)
    text = "; ".join(f"{', '.join(names)} on {place}" for place, names in places.items())
    return text or "no component ran", any(place.startswith(FALLBACK) for place in places)


def summary(report: Report) -> str:
    """One line per backend: with a model its render (size, where each component ran, the comparison),
    else whether it can run here. What the GPU workflow prints first, for pasting into an issue."""
    checks = {c.name: c for c in report.checks}
    lines = []
    for backend in SUMMARY_BACKENDS:
        check = checks.get(f"render {backend}") or _readiness(checks, backend)
        fix = f" (fix: {check.fix})" if check.fix and check.status == "problem" else ""
        lines.append(f"{backend:<12} {check.status:<8} {check.detail}{fix}")
    return "\n".join(lines)


def _readiness(checks: dict[str, Check], backend: str) -> Check:
    if backend != "tensorrt":
        return checks[f"provider {backend}"]
    plans_check = checks.get("tensorrt plans")
    return checks["tensorrt"] if plans_check is None or checks["tensorrt"].status != "ok" else plans_check


def text(report: Report) -> str:
    lines = []
    for check in report.checks:
        lines.append(f"{check.status:<8} {check.name:<20} {check.detail}")
        if check.fix and check.status == "problem":
            lines.append(f"{'':<8} {'':<20} fix: {check.fix}")
    verdict = "everything found works" if report.ok else "problems found"
    lines.append(f"{verdict} ({report.seconds:.1f} s)")
    return "\n".join(lines)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400] or type(exc).__name__

