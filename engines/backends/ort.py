"""ONNX Runtime sessions on CPU, CUDA or ONNX Runtime's TensorRT execution provider.

`get_available_providers()` lists CUDA and TensorRT even where they cannot run (it reports what the
package was built with); asking for them then silently falls back to CPU. So a backend is accepted only
after a real session reports the provider it asked for.

Provider options are per component: TensorRT's fp16 mode only for fp16 graphs (an fp32 VAE built with
fp16 kernels overflows and renders black), optimization profiles derived like the native plans' (without
them the first request of every new shape builds an engine for minutes), and the engine cache under the
user's cache folder, which `export --force` does not delete.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engines import libraries, plans
from engines import manifest as mf
from engines.backends.base import Backend, Session, graph_cache
from engines.errors import EngineFailure

log = logging.getLogger("sdserve.engines")

PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
            "tensorrt-ep": "TensorrtExecutionProvider"}
FALLBACK = {"cpu": [], "cuda": ["cpu"], "tensorrt-ep": ["cuda", "cpu"]}


class OrtSession(Session):
    def __init__(self, name: str, component: mf.Component, session: ort.InferenceSession) -> None:
        super().__init__(name, component)
        self._session = session
        providers = [p.removesuffix("ExecutionProvider") for p in session.get_providers()]
        self.engine = f"ONNX Runtime [{', '.join(providers)}]"  # the providers it really got, best first

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(outputs, self.cast(feeds))
        except Exception as exc:  # onnxruntime's pybind errors (shape mismatch, allocation failure, EPFail…)
            raise EngineFailure(f"{self.name} failed in ONNX Runtime: {exc}") from exc
        self.ran_on[self.engine] += 1
        return {k: v.astype(np.float32, copy=False) if v.dtype == np.float16 else v
                for k, v in zip(outputs, values, strict=True)}


class OrtBackend(Backend):
    def __init__(self, root: Path, name: str, manifest: mf.Manifest, threads: int | None = None, device_id: int = 0,
                 profiles: Sequence[mf.Profile] | None = None) -> None:
        if name not in PROVIDER:
            raise ValueError(f"unknown ONNX Runtime backend {name!r}")
        self.root, self.name, self.manifest, self.threads, self.device_id = root, name, manifest, threads, device_id
        # TensorRT EP profiles in request terms: the plan sets' when built, else the model's native size
        self.profiles = list(profiles) if profiles else plans.make_profiles(manifest)
        self.device = f"CPU ({threads or os.cpu_count()} threads)" if name == "cpu" else f"CUDA device {device_id}"

    def providers(self, key: str, component: mf.Component) -> list[str | tuple[str, dict[str, object]]]:
        chain = [self.name, *FALLBACK[self.name]]
        options: dict[str, dict[str, object]] = {"cuda": {"device_id": self.device_id}}
        if "tensorrt-ep" in chain:  # its shape profiles only where it is asked for (CPU takes any graph)
            options["tensorrt-ep"] = self.tensorrt_options(key, component)
        return [(PROVIDER[n], options[n]) if n in options else PROVIDER[n] for n in chain]

    def tensorrt_options(self, key: str, component: mf.Component) -> dict[str, object]:
        cache = str(_make_cache_dir(self.manifest, key, component))
        options: dict[str, object] = {
            "device_id": self.device_id,
            "trt_fp16_enable": component.precision == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": cache,
        }
        if component.external_data is not None:  # over 2 GB: the EP hands TensorRT the weights itself
            options["trt_load_user_initializer"] = True
        shaped = plans.component_profiles(self.manifest, key, self.profiles)
        for bound in ("min", "opt", "max"):  # a 0-d input (a scalar timestep) has no shape to give: "timestep:"
            options[f"trt_profile_{bound}_shapes"] = ",".join(  # would make the EP drop every profile
                f"{r.name}:{'x'.join(str(d) for d in getattr(r, bound))}" for profile in shaped for r in profile.inputs
                if r.min)
        return options

    def session_options(self, name: str) -> ort.SessionOptions:
        """Options for component `name`'s session (see CPU_ARENA and ONCE_PER_IMAGE for the CPU's)."""
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        if self.name == "cpu":
            options.enable_cpu_mem_arena = CPU_ARENA
            if name in ONCE_PER_IMAGE:  # no NCHWc-reordered nor pre-packed copy of the weights
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
                options.add_session_config_entry("session.disable_prepacking", "1")
        return options

    def open(self, name: str, component: mf.Component) -> OrtSession:
        path = self.root / component.graph.path
        if self.name != "cpu":  # CUDA, cuDNN (and TensorRT) libraries before the first GPU session
            libraries.prepare(self.name)
        if self.name == "tensorrt-ep":
            _check_tensorrt_ep(name, component)
        if self.name == "cpu" and component.optimized_for == "cuda":
            raise EngineFailure(f"{name}: exported with --optimize cuda (fused operators that only CUDA runs); the cpu "
                                "backend cannot run it: use a CUDA backend, or re-export with --optimize cpu or none")
        try:  # no fallback: the wrapper would retry a failed provider on the next one, silently and for good
            session = ort.InferenceSession(str(path), self.session_options(name),
                                           providers=self.providers(name, component), enable_fallback=0)
        except Exception as exc:
            raise EngineFailure(f"ONNX Runtime cannot load {path}: {exc}") from exc
        session.disable_fallback()  # at run time too: an EPFail is an EngineFailure, never a switch to CUDA or CPU
        actual = session.get_providers()[0]
        if actual != PROVIDER[self.name]:
            raise EngineFailure(f"{name}: asked ONNX Runtime for {PROVIDER[self.name]}, it runs on {actual}")
        opened = OrtSession(name, component, session)
        if self.name == "tensorrt-ep":  # beyond its profiles' batch the EP builds another engine, for minutes
            shaped = plans.component_profiles(self.manifest, name, self.profiles)
            opened.max_rows = max((p.batch[2] for p in shaped), default=None)
        return opened


# CPU sessions run without ONNX Runtime's arena: each run's activation block, planned by the memory
# pattern, is allocated and returned to the system per run. Measured on random-sd15 (the SD 1.5
# architecture) at 512×512, 4 steps, two renders in one process, peak resident-set growth: with one arena
# shared by all sessions 8.4 GiB on the traced graphs and 5.8 GiB then 6.8 GiB (it grows from render to
# render: freed blocks fragment) on the `--optimize cpu` graphs; without an arena 6.5 GiB and 5.2–5.3 GiB,
# back to 4.3–4.4 GiB (the weights) between renders. The fused graphs run as fast; the traced ones, whose
# 1 GiB attention score matrices are then allocated afresh at every step, lose 15 % (README, Performance).
CPU_ARENA = False
# On the CPU, the components that run once per image (text encoders, VAE) keep one copy of their weights:
# no pre-packed MatMul weights and no NCHWc-reordered convolution weights (both copies beside the
# originals); the UNet, run at every step, keeps both. Measured on random-sd15, one session each: the
# text encoder 701 → 483 MiB for 0.071 → 0.084 s per call, the VAE decoder 390–534 → 205 MiB for 6.0 →
# 6.5 s per 512×512 decode (6.1 → 7.1 s in `bench pipeline`); the UNet's own resident memory is the same
# either way (3.4–3.5 GiB).
ONCE_PER_IMAGE = frozenset({"text_encoder", "text_encoder_2", "vae_encoder", "vae_decoder"})


def _check_tensorrt_ep(name: str, component: mf.Component) -> None:
    """A graph over 2 GB reaches TensorRT through the EP only with `trt_load_user_initializer`
    (onnxruntime 1.23+, TensorRT 10.13+); refuse clearly rather than fail inside TensorRT's parser."""
    if component.external_data is None:
        return
    runtime = tuple(int(p) for p in ort.__version__.split(".")[:2])
    tensorrt = libraries.tensorrt_version() or "0"
    if runtime < (1, 23) or tuple(int(p) for p in tensorrt.split(".")[:2]) < (10, 13):
        raise EngineFailure(f"{name}: the graph is over 2 GB; tensorrt-ep runs it only with onnxruntime 1.23+ and "
                            f"TensorRT 10.13+ (here {ort.__version__} and {tensorrt}); use the cuda or native "
                            "tensorrt backend")


def _make_cache_dir(manifest: mf.Manifest, key: str, component: mf.Component) -> Path:
    """The cache folder, created with its parents: the EP creates only the last level and throws when the
    parent is missing (a fresh host has no ~/.cache/sdserve/tensorrt-ep)."""
    path = cache_dir(manifest, key, component)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineFailure(f"{key}: cannot create the TensorRT EP's engine cache {path} ({exc}); point "
                            "$SDSERVE_CACHE_DIR at a writable folder") from exc
    return path


def cache_dir(manifest: mf.Manifest, key: str, component: mf.Component) -> Path:
    """The TensorRT EP's engine cache for one graph: under $SDSERVE_CACHE_DIR (default
    ~/.cache/sdserve), keyed by the graph's hash, so a re-export neither deletes nor reuses stale engines."""
    return graph_cache("tensorrt-ep", manifest, key, component)


def available() -> list[str]:
    """Backends this onnxruntime build was compiled with, most capable first (a claim, not a promise)."""
    built = set(ort.get_available_providers())
    return [name for name in ("tensorrt-ep", "cuda", "cpu") if PROVIDER[name] in built]
