"""OpenVINO on the CPU: the same ONNX graphs, computed in bf16 where the processor has bf16 instructions.

ONNX Runtime's x86 kernels compute in fp32 only; OpenVINO's CPU plugin runs a graph in bf16 on processors
with AVX-512 BF16 or AMX (`OPTIMIZATION_CAPABILITIES` lists BF16), which halves the time of the
convolutions and matrix products. It reads the exported graphs directly, the default export's ONNX
Runtime fusions included (its ONNX reader knows `MultiHeadAttention`, `SkipLayerNormalization`, `Gelu`
and `QuickGelu`), and compiles attention into its own tiled kernels.

Precision: `auto` is bf16 where the processor has it and fp32 elsewhere; `fp32` asks for fp32 (matches the
`cpu` backend to ~1e-6); `bf16` refuses a processor without bf16 rather than emulate it slowly.

Compiled graphs are kept on disk (OpenVINO's model cache) under the sdserve cache folder, one folder per
graph hash and precision, so that a restart loads them in seconds instead of compiling again, and a
re-export never reuses a stale one. Each graph is compiled once, for dynamic shapes: compiled per static
shape set it ran no faster here (SD 1.5 at 512², interleaved: UNet 0.99×, VAE decode 1.05×) while every
shape set held its own copy of the weights (+2.2 GiB per set for SD 1.5's UNet in bf16).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engines import manifest as mf
from engines.backends.base import Backend, Session, graph_cache
from engines.errors import EngineFailure

log = logging.getLogger("sdserve.engines")

Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")
_HINT = {"bf16": "bf16", "fp32": "f32"}
LORA_RANK = "lora_rank"  # the named axis of LoRA inputs (`export.lora`)


@functools.cache
def runtime() -> Any | None:
    """The `openvino` module, or None where it is not installed (or fails to import)."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino


def available() -> bool:
    return runtime() is not None


@functools.cache
def _core() -> Any:
    return runtime().Core()


def processor() -> str:
    return str(_core().get_property("CPU", "FULL_DEVICE_NAME"))


def choose_precision(asked: str) -> tuple[str, str]:
    """The precision the graphs compute in, and why: `auto` is bf16 where the CPU plugin reports bf16
    (AVX-512 BF16 or AMX), else fp32."""
    if asked not in PRECISIONS:
        raise EngineFailure(f"unknown precision {asked!r}; one of: {', '.join(PRECISIONS)}")
    capable = "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    units = _bf16_units()
    if asked == "fp32":
        return "fp32", "asked for fp32"
    if asked == "bf16" and not capable:
        raise EngineFailure("precision bf16: this processor has no bf16 instructions (neither AVX-512 BF16 nor AMX); "
                            "use --precision fp32 or auto")
    if asked == "bf16":
        return "bf16", f"asked for bf16; the processor has {units}"
    if capable:
        return "bf16", f"the processor has {units}"
    return "fp32", "the processor has no bf16 instructions"


def _bf16_units() -> str:
    """Which bf16 instructions the processor has, from Linux's cpu flags (for people; OpenVINO decides)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    found = [label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16")) if flag in flags]
    return " and ".join(found) or "bf16 instructions (OpenVINO reports BF16)"


class OpenVinoSession(Session):
    """One compiled graph, with a pool of inference requests so that render threads never share one. LoRA
    inputs are padded with zeros to the model's rank (`rank`), which the graph was compiled for: OpenVINO's
    CPU convolutions take no weights of dynamic shape (the 1×1 LoRA branches), and zero rank adds nothing."""

    def __init__(self, name: str, component: mf.Component, compiled: Any, rank: int | None = None) -> None:
        super().__init__(name, component)
        self._compiled, self._idle = compiled, []
        self._padded = {t.name: t.shape.index(LORA_RANK) for t in component.inputs if LORA_RANK in t.shape} \
            if rank else {}
        self._rank = rank or 0
        self._lock = threading.Lock()
        # what the compiled graph really computes in ("bf16" / "f32"), for the doctor's report
        self.engine = f"OpenVINO [CPU, {compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()}]"

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        inputs = self.cast(feeds)
        for name, axis in self._padded.items():
            value = inputs[name]
            widths = [(0, self._rank - value.shape[axis]) if i == axis else (0, 0) for i in range(value.ndim)]
            inputs[name] = np.pad(value, widths)
        with self._lock:
            request = self._idle.pop() if self._idle else self._compiled.create_infer_request()
        try:
            request.infer(inputs, share_inputs=True)
            values = {name: np.array(request.get_tensor(name).data) for name in outputs}
        except Exception as exc:  # OpenVINO's RuntimeError: a shape it cannot take, memory
            raise EngineFailure(f"{self.name} failed in OpenVINO: {exc}") from exc
        finally:
            with self._lock:
                self._idle.append(request)
        self.ran_on[self.engine] += 1
        return {k: v.astype(np.float32, copy=False) if v.dtype == np.float16 else v for k, v in values.items()}

    def close(self) -> None:
        with self._lock:
            self._idle.clear()
            self._compiled = None


class OpenVinoBackend(Backend):
    name = "openvino"
    # Whole decodes up to 1024² (SD 1.x/2.x's largest size): measured on random-sd21 at 1024² in bf16, the whole
    # decode peaks 1.7 GiB above the weights and takes 0.6× the time of the tiled one (31.8 against 53.1 s).
    tile_above = 128 * 128

    def __init__(self, root: Path, manifest: mf.Manifest, threads: int | None = None, precision: str = "auto") -> None:
        if runtime() is None:
            raise EngineFailure("the openvino backend needs the openvino package: pip install openvino "
                                "(sdserve[cpu] installs it)")
        self.root, self.manifest, self.threads = root, manifest, threads
        self.precision, self.why = choose_precision(precision)
        self.device = f"{processor()} ({threads or os.cpu_count()} threads, OpenVINO {self.precision})"

    def config(self, key: str, component: mf.Component) -> dict[str, Any]:
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINT[self.precision], "PERFORMANCE_HINT": "LATENCY",
                                  "CACHE_DIR": str(cache_dir(self.manifest, key, component) / self.precision)}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        return config

    def open(self, name: str, component: mf.Component) -> OpenVinoSession:
        if component.optimized_for == "cuda":
            raise EngineFailure(f"{name}: exported with --optimize cuda (fused operators that only CUDA runs); the "
                                "openvino backend cannot run it: re-export with --optimize cpu or none")
        path = self.root / component.graph.path
        rank = self.manifest.lora.rank if self.manifest.lora and any(
            LORA_RANK in t.shape for t in component.inputs) else None
        try:
            if self.precision == "bf16":
                path = self.half_weights(name, component, path)
            if rank is None:  # compiled from the path: a cached compilation loads without reading the graph
                compiled = _core().compile_model(str(path), "CPU", self.config(name, component))
            else:
                model = _core().read_model(str(path))
                model.reshape({t.name: runtime().PartialShape(",".join(
                    str(rank) if d == LORA_RANK else str(d) if isinstance(d, int) else "?" for d in t.shape))
                    for t in component.inputs})
                compiled = _core().compile_model(model, "CPU", self.config(name, component))
        except Exception as exc:
            raise EngineFailure(f"OpenVINO cannot compile {path}: {exc}") from exc
        return OpenVinoSession(name, component, compiled, rank)

    def half_weights(self, name: str, component: mf.Component, path: Path) -> Path:
        """For bf16, the graph with its weights stored in fp16 (OpenVINO's IR, written once into the cache): a
        compiled graph keeps the weights it was read with beside its bf16 copy, and fp16 halves them (SD 1.5's
        UNet: 5.7 → 3.7 GiB resident; its output's mean relative error to fp32 3.1e-2 against 2.9e-2)."""
        target = cache_dir(self.manifest, name, component) / "fp16-weights.xml"
        if not target.is_file():
            log.info("%s: storing its weights in fp16 for OpenVINO's bf16 (once per graph)", name)
            target.parent.mkdir(parents=True, exist_ok=True)
            staged = target.with_name(f".{os.getpid()}-{threading.get_ident()}.xml")
            runtime().save_model(_core().read_model(str(path)), str(staged), compress_to_fp16=True)
            os.replace(staged.with_suffix(".bin"), target.with_suffix(".bin"))  # the weights first: the .xml says done
            os.replace(staged, target)
        return target


def cache_dir(manifest: mf.Manifest, key: str, component: mf.Component) -> Path:
    """OpenVINO's model cache for one graph, with a folder per precision: OpenVINO's own key (the shapes,
    processor, OpenVINO version) leaves out the inference precision, and a graph compiled for fp32 then
    loaded for bf16 computes NaN (OpenVINO 2026.4)."""
    return graph_cache("openvino", manifest, key, component)
