"""The native libraries ONNX Runtime's GPU providers need, loaded before their first session.

`onnxruntime-gpu` from PyPI finds CUDA and cuDNN (the `nvidia-*` wheels) only once
`onnxruntime.preload_dlls()` has loaded them (or an earlier `import torch` did, which sdserve never
does at serve time). Its TensorRT provider needs `libnvinfer` loaded too, of the major version the
provider library was linked against (`import tensorrt` loads the `tensorrt_libs` wheel's copy); a
TensorRT of another major makes the provider fail to load deep inside session creation.
"""

from __future__ import annotations

import logging
import mmap
import re
import threading
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


def check_tensorrt() -> None:
    expected = linked_tensorrt_major()
    package = installed("onnxruntime-gpu")
    if expected is None:
        raise EngineFailure(f"this onnxruntime ({package or 'the CPU package ' + ort.__version__}) has no TensorRT "
                            "execution provider; install sdserve[gpu] for tensorrt-ep")
    version = tensorrt_version()
    if version is None:
        raise EngineFailure(f"tensorrt-ep needs TensorRT {expected}.x loaded (onnxruntime-gpu {package} links "
                            f"libnvinfer.so.{expected}); install it: pip install 'tensorrt-cu13=={expected}.*'")
    if int(version.split(".")[0]) != expected:
        raise EngineFailure(f"tensorrt-ep: onnxruntime-gpu {package} was built for TensorRT {expected}.x, "
                            f"TensorRT {version} is installed; install TensorRT {expected}.x or use the native "
                            "`tensorrt` backend (plans built by `python -m export … --tensorrt`)")


def installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
