"""ONNX Runtime sessions on CPU, CUDA or ONNX Runtime's TensorRT execution provider.

`get_available_providers()` lists CUDA and TensorRT even where they cannot run (it reports what the
package was built with); asking for them then silently falls back to CPU. So a backend is accepted only
after a real session reports the provider it asked for.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engines import manifest as mf
from engines.backends.base import Backend, Session
from engines.errors import EngineFailure

log = logging.getLogger("sdserve.engines")

PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
            "tensorrt-ep": "TensorrtExecutionProvider"}
FALLBACK = {"cpu": [], "cuda": ["cpu"], "tensorrt-ep": ["cuda", "cpu"]}


class OrtSession(Session):
    def __init__(self, name: str, component: mf.Component, session: ort.InferenceSession) -> None:
        super().__init__(name, component)
        self._session = session

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(outputs, self.cast(feeds))
        except Exception as exc:  # onnxruntime's pybind errors (shape mismatch, allocation failure…)
            raise EngineFailure(f"{self.name} failed in ONNX Runtime: {exc}") from exc
        return {k: v.astype(np.float32, copy=False) if v.dtype == np.float16 else v
                for k, v in zip(outputs, values, strict=True)}


class OrtBackend(Backend):
    def __init__(self, root: Path, name: str, threads: int | None = None, device_id: int = 0,
                 fp16: bool = False) -> None:
        if name not in PROVIDER:
            raise ValueError(f"unknown ONNX Runtime backend {name!r}")
        self.root, self.name, self.threads, self.device_id, self.fp16 = root, name, threads, device_id, fp16
        self.device = f"CPU ({threads or os.cpu_count()} threads)" if name == "cpu" else f"CUDA device {device_id}"

    def providers(self) -> list[str | tuple[str, dict[str, object]]]:
        options: dict[str, dict[str, object]] = {
            "cuda": {"device_id": self.device_id},
            "tensorrt-ep": {
                "device_id": self.device_id,
                "trt_fp16_enable": self.fp16,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(self.root / "tensorrt-ep-cache"),
                "trt_timing_cache_enable": True,
            },
        }
        chain = [self.name, *FALLBACK[self.name]]
        return [(PROVIDER[n], options[n]) if n in options else PROVIDER[n] for n in chain]

    def open(self, name: str, component: mf.Component) -> OrtSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        path = self.root / component.graph.path
        try:
            session = ort.InferenceSession(str(path), options, providers=self.providers())
        except Exception as exc:
            raise EngineFailure(f"ONNX Runtime cannot load {path}: {exc}") from exc
        actual = session.get_providers()[0]
        if actual != PROVIDER[self.name]:
            raise EngineFailure(f"{name}: asked ONNX Runtime for {PROVIDER[self.name]}, it runs on {actual}")
        return OrtSession(name, component, session)


def available() -> list[str]:
    """Backends this onnxruntime build was compiled with, most capable first (a claim, not a promise)."""
    built = set(ort.get_available_providers())
    return [name for name in ("tensorrt-ep", "cuda", "cpu") if PROVIDER[name] in built]
