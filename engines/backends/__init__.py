"""Choosing and opening a backend for a model directory."""

from __future__ import annotations

import logging
from pathlib import Path

from engines import manifest as mf
from engines.backends import openvino, ort
from engines.backends.base import Backend, Session
from engines.backends.tensorrt import TensorRtBackend
from engines.errors import EngineFailure, InvalidRequest

log = logging.getLogger("sdserve.engines")

BACKENDS = ("auto", "cpu", "openvino", "cuda", "tensorrt-ep", "tensorrt")
PRECISIONS = openvino.PRECISIONS


def open_sessions(root: Path, manifest: mf.Manifest, backend: str = "auto", threads: int | None = None,
                  verify: bool = True, precision: str = "auto") -> tuple[Backend, dict[str, Session]]:
    """Every component of the model on the named backend, or with "auto" on the most capable one that
    actually runs here (each candidate is tried by loading the graphs, not trusted from a list). Any
    failure while loading (TensorRT's RuntimeError, an OSError from a library) is an EngineFailure, so
    "auto" moves on and a server's loader survives. `precision` (auto, bf16, fp32) is what the openvino
    backend computes in; the others compute in the graphs' own precision and take only auto (the cpu
    backend also fp32)."""
    if backend not in BACKENDS:
        raise InvalidRequest("backend", f"unknown backend {backend!r}; one of: {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise InvalidRequest("precision", f"unknown precision {precision!r}; one of: {', '.join(PRECISIONS)}")
    if backend != "auto" and not _computes_in(backend, precision):
        raise InvalidRequest("precision", f"the {backend} backend computes in the graphs' own precision: "
                             f"precision {precision} needs the openvino backend")
    candidates = [name for name in _auto(manifest) if _computes_in(name, precision)] \
        if backend == "auto" else [backend]
    if not candidates:
        raise EngineFailure(f"precision {precision} needs the openvino backend: pip install openvino")
    failures = []
    for name in candidates:
        try:
            chosen = _create(root, manifest, name, threads, verify, precision)
            sessions = _open_all(chosen, manifest)
            if backend == "auto" and name == "cpu" and not openvino.available():  # half the speed on bf16 CPUs
                log.warning("%s: the openvino package is not installed, so the CPU renders on ONNX Runtime in "
                            "fp32 (pip install openvino, or sdserve[cpu], for bf16 where the processor has it)",
                            root.name)
            return chosen, sessions
        except Exception as exc:
            failure = exc if isinstance(exc, EngineFailure) else EngineFailure(
                f"{name} failed while loading: {type(exc).__name__}: {exc}")
            if backend != "auto":
                raise failure from exc
            log.warning("%s: backend %s is not usable here (%s); trying the next", root.name, name, failure)
            failures.append(f"{name}: {failure}")
    raise EngineFailure(f"{root}: no backend could load the model ({'; '.join(failures)})")


def open_component(root: Path, manifest: mf.Manifest, key: str, backend: str, threads: int | None = None,
                   precision: str = "auto") -> Session:
    """One component alone on a named backend (`bench graphs` times graphs one by one)."""
    if backend not in BACKENDS[1:] or not _computes_in(backend, precision):
        raise InvalidRequest("backend", f"cannot open {key} on backend {backend!r} in precision {precision!r}")
    return _create(root, manifest, backend, threads, True, precision).open(key, manifest.components[key])


def auto_order(manifest: mf.Manifest, built: list[str]) -> list[str]:
    """What "auto" tries, best first: native TensorRT when the model has plans; then ONNX Runtime's
    TensorRT EP only when plans' profiles say which shapes to build engines for (else it would build
    one, for minutes, inside the first request of each new shape), then CUDA, then the CPU on OpenVINO (bf16
    where the processor has it), then on ONNX Runtime."""
    order = ["tensorrt"] if manifest.tensorrt else []
    if manifest.tensorrt and "tensorrt-ep" in built:
        order.append("tensorrt-ep")
    return order + [name for name in ("cuda", "openvino", "cpu") if name in built]


def _auto(manifest: mf.Manifest) -> list[str]:
    """`auto_order` over the backends installed here."""
    return auto_order(manifest, [*ort.available(), *(["openvino"] if openvino.available() else [])])


def _computes_in(backend: str, precision: str) -> bool:
    return backend == "openvino" or precision == "auto" or (backend == "cpu" and precision == "fp32")


def _create(root: Path, manifest: mf.Manifest, name: str, threads: int | None, verify: bool,
            precision: str) -> Backend:
    if name == "tensorrt":
        return TensorRtBackend(root, manifest, threads=threads, verify=verify)
    if name == "openvino":
        return openvino.OpenVinoBackend(root, manifest, threads=threads, precision=precision)
    profiles = manifest.tensorrt[-1].profiles if manifest.tensorrt else None
    return ort.OrtBackend(root, name, manifest, threads=threads, profiles=profiles)


def _open_all(backend: Backend, manifest: mf.Manifest) -> dict[str, Session]:
    """Open every component; on a failure close those already open (their GPU memory is not ours to keep)."""
    sessions: dict[str, Session] = {}
    try:
        for key, component in manifest.components.items():
            sessions[key] = backend.open(key, component)
    except BaseException:
        for session in sessions.values():
            session.close()
        raise
    return sessions


__all__ = ["BACKENDS", "PRECISIONS", "Backend", "Session", "auto_order", "open_component", "open_sessions"]
