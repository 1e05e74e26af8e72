"""The models a node can serve, loaded or not: one `Entry` per model folder found under --models-dir, with its
state, its size and, while loaded, its queue.

    available ──first request, or POST /v0/models/{id}/load──▶ loading ──▶ loaded
        ▲                                                          │           │
        └──────────── unloaded (idle: least recently used first, or POST …/unload) ◀┘
                                                                   └──▶ failed (why: its requests' answer)

A model's size is what loading it really took: the growth of the process's resident memory during its load
(loads run one at a time, so the growth is its own), the largest seen; before its first load, the size of
its files. Everything here is read and changed on the event loop only.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec

import engines
from server.errors import ApiError
from server.node.queue import ModelQueue

ModelState = Literal["available", "loading", "loaded", "failed"]


@dataclass(eq=False)
class Entry:
    path: Path
    info: engines.ModelInfo | None  # from the manifest, then the loaded pipeline's; None: its manifest is unreadable
    files: int  # bytes of its files: its size until a load measures it
    state: ModelState = "available"
    error: ApiError | None = None  # failed: what its requests are answered
    measured: int = 0  # the largest growth of resident memory seen while it loaded; 0: never measured
    queue: ModelQueue | None = None  # while loaded
    reserved: bool = False  # loading, its room in the budget taken
    users: int = 0  # requests waiting for its load, or about to queue on it: never evicted meanwhile
    last_used: float = field(default_factory=time.monotonic)
    task: asyncio.Future[None] | None = None  # its load in progress: every request for it waits on this one

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def size(self) -> int:
        return self.measured or self.files

    @property
    def held(self) -> bool:
        """Takes room in the budget: loaded, or loading with its room reserved."""
        return self.state == "loaded" or self.reserved

    @property
    def offered(self) -> bool:
        """Requests may ask for it: it loads on demand when it is not loaded, and one too large for the budget
        answers each request so (a model that failed to load is not offered: its requests would fail too)."""
        too_large = self.error is not None and self.error.code == "model_too_large"
        return self.info is not None and (self.state != "failed" or too_large)

    def busy(self) -> bool:
        """Rendering, requests queued or waiting for it: never unloaded then."""
        return self.users > 0 or self.state == "loading" or (self.queue is not None and not self.queue.idle())

    def view(self) -> ModelView:
        queue = self.queue
        return ModelView(id=self.name, state=self.state, bytes=self.size, measured=self.measured > 0,
                         error=self.error.message if self.error else None,
                         running=queue.running if queue else 0, waiting=queue.waiting if queue else self.users,
                         idle_seconds=round(time.monotonic() - self.last_used, 1) if queue else None,
                         backend=self.info.backend if self.info else None)


class ModelView(msgspec.Struct):
    """One model as `GET /v0/models` lists it."""

    id: str
    state: ModelState
    bytes: int  # measured while it loaded (`measured`), else the size of its files
    measured: bool
    error: str | None  # failed: why
    running: int
    waiting: int  # requests queued; not loaded: requests waiting for its load
    idle_seconds: float | None  # loaded: since its last request
    backend: str | None


class ModelList(msgspec.Struct):
    data: list[ModelView]
    max_loaded_models: int | None
    max_loaded_bytes: int | None
    loaded_bytes: int  # what the loaded models take (measured or estimated), as the budget counts it
    object: str = "list"


def describe(path: Path, backend: str, lora_dir: str | None) -> Entry:
    """A model folder as found: available, or failed when its manifest cannot be read."""
    files = files_bytes(path)
    try:
        return Entry(path, engines.describe(path, backend=backend, lora_dir=lora_dir), files)
    except Exception as exc:  # a folder that cannot be described is reported, never the scan's end
        error = ApiError(503, f"model '{path.name}' cannot be read: {type(exc).__name__}: {exc}",
                         code="model_load_failed", headers={"Retry-After": "10"})
        return Entry(path, None, files, state="failed", error=error)


def files_bytes(path: Path) -> int:
    """The size of a model folder's files (symbolic links followed), a model's size before it has loaded."""
    total = 0
    for folder, _, names in os.walk(path, followlinks=True):
        for name in names:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except OSError:  # a broken link or a file removed meanwhile
                continue
    return total


def resident_bytes() -> int | None:
    """This process's resident memory (Linux: /proc/self/statm); None where it cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def too_large(entry: Entry, budget: int) -> ApiError:
    how = "loading it took" if entry.measured else "its files take (it has not loaded yet)"
    return ApiError(507, f"model '{entry.name}' does not fit the memory budget: {how} {entry.size} bytes, "
                    f"--max-loaded-bytes is {budget}", param="model", code="model_too_large")
