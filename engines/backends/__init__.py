"""Choosing and opening a backend for a model directory."""

from __future__ import annotations

import logging
from pathlib import Path

from engines import manifest as mf
from engines.backends import ort
from engines.backends.base import Backend, Session
from engines.backends.tensorrt import TensorRtBackend
from engines.errors import EngineFailure, InvalidRequest

log = logging.getLogger("sdserve.engines")

BACKENDS = ("auto", "cpu", "cuda", "tensorrt-ep", "tensorrt")


def open_sessions(root: Path, manifest: mf.Manifest, backend: str = "auto", threads: int | None = None,
                  verify: bool = True) -> tuple[Backend, dict[str, Session]]:
    """Every component of the model on the named backend, or with "auto" on the most capable one that
    actually runs here (each candidate is tried by loading the graphs, not trusted from a list). Any
    failure while loading (TensorRT's RuntimeError, an OSError from a library) is an EngineFailure, so
    "auto" moves on and a server's loader survives."""
    if backend not in BACKENDS:
        raise InvalidRequest("backend", f"unknown backend {backend!r}; one of: {', '.join(BACKENDS)}")
    candidates = auto_order(manifest, ort.available()) if backend == "auto" else [backend]
    failures = []
    for name in candidates:
        try:
            chosen = _create(root, manifest, name, threads, verify)
            return chosen, _open_all(chosen, manifest)
        except Exception as exc:
            failure = exc if isinstance(exc, EngineFailure) else EngineFailure(
                f"{name} failed while loading: {type(exc).__name__}: {exc}")
            if backend != "auto":
                raise failure from exc
            log.warning("%s: backend %s is not usable here (%s); trying the next", root.name, name, failure)
            failures.append(f"{name}: {failure}")
    raise EngineFailure(f"{root}: no backend could load the model ({'; '.join(failures)})")


def auto_order(manifest: mf.Manifest, built: list[str]) -> list[str]:
    """What "auto" tries, best first: native TensorRT when the model has plans; then ONNX Runtime's
    TensorRT EP only when plans' profiles say which shapes to build engines for (else it would build
    one, for minutes, inside the first request of each new shape), then CUDA, then the CPU."""
    order = ["tensorrt"] if manifest.tensorrt else []
    if manifest.tensorrt and "tensorrt-ep" in built:
        order.append("tensorrt-ep")
    return order + [name for name in ("cuda", "cpu") if name in built]


def _create(root: Path, manifest: mf.Manifest, name: str, threads: int | None, verify: bool) -> Backend:
    if name == "tensorrt":
        return TensorRtBackend(root, manifest, threads=threads, verify=verify)
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


__all__ = ["BACKENDS", "Backend", "Session", "auto_order", "open_sessions"]
