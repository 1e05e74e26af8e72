"""Choosing and opening a backend for a model directory."""

from __future__ import annotations

import logging
from pathlib import Path

from engines import manifest as mf
from engines.backends import ort
from engines.backends.base import Backend, Session
from engines.errors import EngineFailure, InvalidRequest

log = logging.getLogger("sdserve.engines")

BACKENDS = ("auto", "cpu", "cuda", "tensorrt-ep")


def open_sessions(root: Path, manifest: mf.Manifest, backend: str = "auto",
                  threads: int | None = None) -> tuple[Backend, dict[str, Session]]:
    """Every component of the model on the named backend, or with "auto" on the most capable one that
    actually runs here (each candidate is tried by loading the graphs, not trusted from a list)."""
    if backend not in BACKENDS:
        raise InvalidRequest("backend", f"unknown backend {backend!r}; one of: {', '.join(BACKENDS)}")
    candidates = ort.available() if backend == "auto" else [backend]
    fp16 = any(c.precision == "fp16" for c in manifest.components.values())
    failures = []
    for name in candidates:
        chosen = ort.OrtBackend(root, name, threads=threads, fp16=fp16)
        try:
            return chosen, {key: chosen.open(key, component) for key, component in manifest.components.items()}
        except EngineFailure as exc:
            if backend != "auto":
                raise
            log.warning("%s: backend %s is not usable here (%s); trying the next", root.name, name, exc)
            failures.append(f"{name}: {exc}")
    raise EngineFailure(f"{root}: no backend could load the model ({'; '.join(failures)})")


__all__ = ["BACKENDS", "Backend", "Session", "open_sessions"]
