"""The NVIDIA GPU as TensorRT sees it: which TensorRT, which device, which compute capability.

TensorRT and cuda-python are imported here, lazily, and nowhere at module level: a CPU node (and CI)
has neither, and `import engines` must keep working there. cuda-python moved its runtime bindings from
`cuda.cudart` to `cuda.bindings.runtime` (12.6+; the old path is gone in 13); both are accepted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from engines.errors import EngineFailure


class GpuUnavailable(EngineFailure):
    """TensorRT, cuda-python or a CUDA GPU is missing; the message says which, in one line."""


@dataclass(frozen=True)
class Gpu:
    name: str  # "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "9.0"
    tensorrt_version: str  # "10.7.0"
    total_memory: int  # bytes


def tensorrt() -> ModuleType:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise GpuUnavailable("TensorRT is not installed (on a host with an NVIDIA GPU: pip install "
                             f"'sdserve[tensorrt]'): {exc}") from exc
    return trt


def cudart() -> ModuleType:
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as exc:
            raise GpuUnavailable(f"cuda-python is not installed (pip install 'sdserve[tensorrt]'): {exc}") from exc
    return runtime


def call(result: Any) -> Any:
    """Unwrap a cuda-python result: (error, value...) → value, raising EngineFailure on an error."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart().cudaError_t.cudaSuccess:
        raise EngineFailure(f"CUDA error {error_name(error)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def error_name(error: Any) -> str:
    return str(getattr(error, "name", error))


def probe(device_id: int = 0) -> Gpu:
    """The GPU plans would be built for or loaded on; GpuUnavailable when anything is missing."""
    trt = tensorrt()
    runtime = cudart()
    error, count = runtime.cudaGetDeviceCount()
    if error != runtime.cudaError_t.cudaSuccess:
        raise GpuUnavailable(f"no CUDA GPU here ({error_name(error)})")
    if count <= device_id:
        raise GpuUnavailable(f"no CUDA GPU {device_id} here ({count} found)")
    props = call(runtime.cudaGetDeviceProperties(device_id))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return Gpu(name=name.rstrip("\0"), compute_capability=f"{props.major}.{props.minor}",
               tensorrt_version=trt.__version__, total_memory=int(props.totalGlobalMem))


def free_memory() -> tuple[int, int]:
    """(free, total) bytes on the current device."""
    free, total = call(cudart().cudaMemGetInfo())
    return int(free), int(total)


def logger(name: str = "sdserve.tensorrt") -> Any:
    """A `trt.ILogger` that forwards TensorRT's messages to `logging` and keeps its errors, so that a
    failure can say what TensorRT said. Hold a reference as long as TensorRT objects use it."""
    trt = tensorrt()
    severity = trt.ILogger.Severity
    levels = {severity.INTERNAL_ERROR: logging.ERROR, severity.ERROR: logging.ERROR,
              severity.WARNING: logging.WARNING, severity.INFO: logging.DEBUG, severity.VERBOSE: logging.DEBUG}
    target = logging.getLogger(name)

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, level: Any, message: str) -> None:
            if levels.get(level, logging.DEBUG) >= logging.ERROR:
                self.errors.append(message)
            target.log(levels.get(level, logging.DEBUG), "%s", message)

        def last_error(self) -> str:
            return self.errors[-1] if self.errors else "no error message from TensorRT"

    return Logger()
