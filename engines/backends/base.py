"""The backend interface: one small object per compiled component, so the pipeline never knows what it
runs on (ONNX Runtime on CPU, CUDA or its TensorRT EP; native TensorRT plans)."""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path

import numpy as np

from engines import manifest as mf
from engines.vae_tiling import THRESHOLD


class Session(ABC):
    """One loaded component graph. `run` takes and returns named arrays; it casts the feeds to the
    graph's declared dtypes and returns float outputs as float32. `max_rows`: the most batch rows one call
    runs at its best (TensorRT: its largest profile); None for no limit. `ran_on` counts the calls per
    engine that really ran them ("TensorRT plan", "ONNX Runtime [CUDA, CPU]"), for the doctor's report."""

    max_rows: int | None = None

    def __init__(self, name: str, component: mf.Component) -> None:
        self.name = name
        self.component = component
        self._dtypes = {t.name: np.dtype(t.dtype) for t in component.inputs}
        self.ran_on: Counter[str] = Counter()

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.component.inputs]

    def cast(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # asarray, not ascontiguousarray: that one turns a scalar (optimum's UNet timestep) into shape (1,)
        return {name: np.asarray(feeds[name], dtype=self._dtypes[name], order="C") for name in self._dtypes}

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]: ...

    def close(self) -> None:  # noqa: B027 - most sessions free themselves when dropped
        pass


class Backend(ABC):
    name: str  # "cpu", "openvino", "cuda", "tensorrt-ep", "tensorrt"
    device: str  # what it runs on, for people: "CPU (2 threads)", "NVIDIA H100 80GB HBM3"
    tile_above: int = THRESHOLD  # latent cells above which the VAE decodes in tiles (`engines.vae_tiling`)

    @abstractmethod
    def open(self, name: str, component: mf.Component) -> Session: ...


def cache_root() -> Path:
    """Where backends keep what they compile from a model's graphs: $SDSERVE_CACHE_DIR, default
    ~/.cache/sdserve (outside the model directory, which `export --force` replaces)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdserve"
    return Path(os.environ.get("SDSERVE_CACHE_DIR") or default)


def graph_cache(kind: str, manifest: mf.Manifest, key: str, component: mf.Component) -> Path:
    """One graph's folder under `cache_root()/kind`, keyed by the graph's hash: a re-export neither deletes
    nor reuses what was compiled from the old graph."""
    digest = hashlib.sha256("".join(ref.sha256 for ref in component.files()).encode()).hexdigest()[:16]
    return cache_root() / kind / f"{manifest.name}-{key}-{digest}"
