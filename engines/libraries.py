"""The native libraries ONNX Runtime's GPU providers need, loaded before their first session.

`onnxruntime-gpu` from PyPI finds CUDA and cuDNN (the `nvidia-*` wheels) only once
`onnxruntime.preload_dlls()` has loaded them (or an earlier `import torch` did, which sdserve never
does at serve time). Its TensorRT provider needs `libnvinfer` loaded too, of the major version the
provider library was linked against (`import tensorrt` loads the `tensorrt_libs` wheel's copy); a
TensorRT of another major makes the provider fail to load deep inside session creation.

onnxruntime-gpu 1.31's CUDA 13 wheels link the EP against TensorRT 10 (`libnvinfer.so.10`; onnxruntime
issue #32278), while the native backend uses TensorRT 11: one environment holds one TensorRT, so the EP
works only where its major matches (`ep_unavailable` says why not, for loading and for the doctor alike).
"""

from __future__ import annotations

import logging
import mmap
import re
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import onnxruntime as ort

from engines.errors import EngineFailure

log = logging.getLogger("sdserve.engines")

TENSORRT_PROVIDER_LIBRARY = "libonnxruntime_providers_tensorrt.so"
_lock = threading.Lock()
_prepared: set[str] = set()


def prepare(backend: str) -> None:
    """Load what `backend` ("cuda", "tensorrt-ep") needs, once per process. Raises EngineFailure with
    the fix when the TensorRT provider cannot work here."""
    with _lock:
        if backend in _prepared:
            return
        if "gpu" not in _prepared:
            preload_cuda()
            _prepared.add("gpu")
        if backend == "tensorrt-ep":
            check_tensorrt()
        _prepared.add(backend)


def preload_cuda() -> None:
    """CUDA and cuDNN from the nvidia wheels (a no-op in the CPU package, which has no CUDA build)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:  # onnxruntime < 1.21: the libraries must be on the loader's path
        log.warning("onnxruntime %s has no preload_dlls(); CUDA and cuDNN must be on LD_LIBRARY_PATH", ort.__version__)
        return
    try:
        preload()
    except Exception as exc:  # it prints what it could not load; a missing library fails the session later
        log.warning("onnxruntime.preload_dlls() failed: %s", exc)


def provider_library() -> Path:
    return Path(ort.__file__).parent / "capi" / TENSORRT_PROVIDER_LIBRARY


def linked_tensorrt_major(library: Path | None = None) -> int | None:
    """The libnvinfer major version the TensorRT provider library was linked against (from its
    DT_NEEDED entry), or None without that library (the CPU package, or a build without TensorRT)."""
    library = library or provider_library()
    if not library.is_file():
        return None
    with open(library, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        found = re.search(rb"libnvinfer\.so\.(\d+)", data)
        return int(found.group(1)) if found else None


def tensorrt_version() -> str | None:
    """The TensorRT Python package's version, importing it (which loads libnvinfer); None without it."""
    try:
        import tensorrt
    except ImportError:
        return None
    except Exception as exc:  # OSError and friends: the wheel is there, its libraries are not loadable
        raise EngineFailure(f"TensorRT is installed but cannot load: {type(exc).__name__}: {exc}") from exc
    return str(tensorrt.__version__)


@dataclass(frozen=True)
class TensorRtStack:
    """Which TensorRT backends can run here: the libnvinfer major ONNX Runtime's TensorRT EP links (None:
    this onnxruntime has no such EP), the installed TensorRT Python package's version (None: not installed),
    why that package cannot load (if it cannot), and cuda-python's version (the native backend's other half)."""

    linked_major: int | None
    tensorrt: str | None
    error: str | None = None
    cuda_python: str | None = None

    @property
    def tensorrt_major(self) -> int | None:
        return int(self.tensorrt.split(".")[0]) if self.tensorrt else None


def tensorrt_stack() -> TensorRtStack:
    """This environment's TensorRT stack (imports TensorRT where it is installed, loading libnvinfer)."""
    cuda_python = installed("cuda-python")
    try:
        return TensorRtStack(linked_tensorrt_major(), tensorrt_version(), cuda_python=cuda_python)
    except EngineFailure as exc:
        return TensorRtStack(linked_tensorrt_major(), None, str(exc), cuda_python)


def ep_unavailable(stack: TensorRtStack) -> str | None:
    """Why the TensorRT EP cannot run with `stack`, in one line; None when it can (the majors match)."""
    if stack.linked_major is None:
        package = installed("onnxruntime-gpu")
        return (f"this onnxruntime ({package or 'the CPU package ' + ort.__version__}) has no TensorRT execution "
                "provider; install sdserve[gpu] for tensorrt-ep")
    if stack.error is not None:
        return f"TensorRT EP unavailable: {stack.error}"
    if stack.tensorrt_major != stack.linked_major:
        installed_text = f"TensorRT {stack.tensorrt_major} installed" if stack.tensorrt else "no TensorRT installed"
        return f"TensorRT EP unavailable: links TensorRT {stack.linked_major}, {installed_text}"
    return None


def ep_fix(stack: TensorRtStack) -> str:
    return (f"the EP needs TensorRT {stack.linked_major}.x loaded, in an environment without sdserve[tensorrt] (one "
            "TensorRT per environment; sdserve[gpu,tensorrt-ep] pins TensorRT 10 for onnxruntime-gpu 1.31); or use "
            "the native `tensorrt` backend (plans from `python -m export … --tensorrt`) or `cuda`")


def check_tensorrt() -> None:
    stack = tensorrt_stack()
    reason = ep_unavailable(stack)
    if reason is not None:
        raise EngineFailure(reason if stack.linked_major is None else f"{reason}; {ep_fix(stack)}")


def installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
