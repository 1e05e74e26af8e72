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
    actually runs here (each candidate is tried by loading the graphs, not trusted from a list). "auto"
    tries native TensorRT first when the manifest lists plans, then ONNX Runtime's providers."""
    if backend not in BACKENDS:
        raise InvalidRequest("backend", f"unknown backend {backend!r}; one of: {', '.join(BACKENDS)}")
    candidates = ([*(["tensorrt"] if manifest.tensorrt else []), *ort.available()] if backend == "auto"
                  else [backend])
    failures = []
    for name in candidates:
        try:
            chosen = _create(root, manifest, name, threads, verify)
            return chosen, _open_all(chosen, manifest)
        except EngineFailure as exc:
            if backend != "auto":
                raise
            log.warning("%s: backend %s is not usable here (%s); trying the next", root.name, name, exc)
            failures.append(f"{name}: {exc}")
    raise EngineFailure(f"{root}: no backend could load the model ({'; '.join(failures)})")


def _create(root: Path, manifest: mf.Manifest, name: str, threads: int | None, verify: bool) -> Backend:
    if name == "tensorrt":
        return TensorRtBackend(root, manifest, threads=threads, verify=verify)
    fp16 = any(c.precision == "fp16" for c in manifest.components.values())
    return ort.OrtBackend(root, name, threads=threads, fp16=fp16)


def _open_all(backend: Backend, manifest: mf.Manifest) -> dict[str, Session]:
    """Open every component; on a failure close those already open (their GPU memory is not ours to keep)."""
    sessions: dict[str, Session] = {}
    try:
        for key, component in manifest.components.items():
            sessions[key] = backend.open(key, component)
    except EngineFailure:
        for session in sessions.values():
            session.close()
        raise
    return sessions


__all__ = ["BACKENDS", "Backend", "Session", "open_sessions"]
