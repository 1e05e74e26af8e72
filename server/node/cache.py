"""The node's models as a cache: every model folder it can serve is known (`server.node.catalog`), and only
what fits the budget (--max-loaded-models, --max-loaded-bytes) is loaded.

A request for a model that is not loaded starts its load and waits for it (the wait counts toward its
timeout); requests for the same model meanwhile wait for that same load. To make room a load unloads the
least recently used idle models (a model rendering, with requests queued, or with requests waiting for it,
is never unloaded); while every loaded model is in use it waits until one is idle. A model larger than the
memory budget fails its load with 507 `model_too_large`, before loading when its size is known. Without a
budget every model loads at start-up, as before (`preload`). Loads run one at a time, on a thread.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path

import engines
from server.errors import ApiError
from server.metrics import Metrics
from server.node.catalog import Entry, ModelList, describe, resident_bytes, too_large
from server.node.models_dir import discover, nothing_servable
from server.node.queue import ModelQueue
from server.settings import Settings

log = logging.getLogger("sdserve.server")
ROOM_POLL = 0.05  # seconds between looks for an idle model to unload while every loaded one is in use
CLOSE_WAIT = 10.0  # seconds an unloaded model's threads get to end (it is idle: they end at once)


class ModelCache:
    def __init__(self, settings: Settings, metrics: Metrics, open_queue: Callable[[Path], ModelQueue]) -> None:
        self.settings, self.metrics, self.open_queue = settings, metrics, open_queue
        self.max_models, self.max_bytes = settings.max_loaded_models, settings.max_loaded_bytes
        self.budgeted = self.max_models is not None or self.max_bytes is not None
        self.entries: dict[str, Entry] = {path.name: self._describe(path) for path in self._found()}
        self.empty = nothing_servable(settings.models_dir, settings.models)  # why there is nothing to serve
        self.preloading = not self.budgeted  # until every model has been tried once (no budget)
        self._one_load = asyncio.Lock()

    # -- what there is ---------------------------------------------------------------------------------

    def _found(self) -> list[Path]:
        return discover(self.settings.models_dir, self.settings.models)

    def _describe(self, path: Path) -> Entry:
        return describe(path, self.settings.backend, self.settings.lora_dir)

    def loaded(self) -> dict[str, ModelQueue]:
        return {name: e.queue for name, e in self.entries.items() if e.queue is not None}

    def listing(self) -> ModelList:
        return ModelList(data=[e.view() for _, e in sorted(self.entries.items())], max_loaded_models=self.max_models,
                         max_loaded_bytes=self.max_bytes, loaded_bytes=sum(e.size for e in self.entries.values()
                                                                           if e.held))

    def room_for(self) -> list[str]:
        """Models not loaded that would load now without unloading another."""
        return sorted(e.name for e in self.entries.values() if e.offered and not e.held and self._fits(e))

    def _fits(self, entry: Entry) -> bool:
        held = [e for e in self.entries.values() if e.held and e is not entry]
        return ((self.max_models is None or len(held) < self.max_models)
                and (self.max_bytes is None or sum(e.size for e in held) + entry.size <= self.max_bytes))

    async def rescan(self, retry_failed: bool = True) -> tuple[list[str], list[str]]:
        """Look at the models folder again: folders added become available, folders removed leave (a model in
        use stays until a rescan finds it idle), and with `retry_failed` (an asked-for rescan, not the periodic
        one) models that failed are read afresh. A loaded model stays as it is. (added, removed)."""
        found = {path.name: path for path in await asyncio.to_thread(self._found)}
        fresh = [path for name, path in found.items()
                 if name not in self.entries or self._replaceable(self.entries[name], path, retry_failed)]
        described = await asyncio.to_thread(lambda: [self._describe(path) for path in fresh])
        removed = []
        for name in [name for name in self.entries if name not in found]:
            entry = self.entries.get(name)
            if entry is not None and not entry.busy():  # checked before each: a request may have queued meanwhile
                removed.append(name)
                await self._unload(self.entries.pop(name), "its folder was removed")
        added = [entry.name for entry in described if entry.name not in self.entries]
        for entry in described:
            current = self.entries.get(entry.name)
            if current is None or self._replaceable(current, entry.path, retry_failed):
                self.entries[entry.name] = entry
        self.empty = await asyncio.to_thread(nothing_servable, self.settings.models_dir, self.settings.models)
        if added or removed:
            log.info("models folder rescanned: %s added, %s removed", ", ".join(added) or "none",
                     ", ".join(removed) or "none")
        return sorted(added), sorted(removed)

    @staticmethod
    def _replaceable(entry: Entry, path: Path, retry_failed: bool) -> bool:
        """A rescan reads a known model afresh only while nothing holds it: failed (when asked), or moved."""
        if entry.busy() or entry.queue is not None:
            return False
        return (entry.state == "failed" and retry_failed) or (entry.state != "failed" and entry.path != path)

    async def rescan_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await self.rescan(retry_failed=False)  # a model that failed stays failed until asked: no retry loop

    async def reread(self) -> None:
        """After the LoRA directory was read again: the models not loaded are described again (their adapters)."""
        idle = [e.path for e in self.entries.values() if e.state == "available"]
        for entry in await asyncio.to_thread(lambda: [self._describe(path) for path in idle]):
            if (current := self.entries.get(entry.name)) is not None and current.state == "available":
                current.info = entry.info

    # -- loading and unloading -------------------------------------------------------------------------

    async def preload(self) -> None:
        """Without a budget: every model, one after the other, at start-up."""
        try:
            for entry in sorted(self.entries.values(), key=lambda e: e.name):
                if entry.state == "available":
                    await self._loading(entry)
        finally:
            self.preloading = False

    async def acquire(self, name: str) -> ModelQueue:
        """The model's queue, loading it first if need be (404 unknown, its error when it failed to load).
        The caller queues on it before its next await, so it cannot be unloaded in between."""
        entry = self._entry(name)
        entry.users += 1
        try:
            while True:
                if entry.state == "failed":
                    raise entry.error or ApiError(503, f"model '{name}' failed to load", code="model_load_failed")
                if self.entries.get(name) is not entry:
                    raise ApiError(404, f"model '{name}' is gone (its folder was removed)", param="model",
                                   code="model_not_found")
                if entry.queue is not None:
                    entry.last_used = time.monotonic()
                    return entry.queue
                await asyncio.shield(self._loading(entry))
        finally:
            entry.users -= 1

    async def load(self, name: str) -> Entry:
        """Load a model now (admin): a model that failed is tried again."""
        entry = self._entry(name)
        if entry.state == "failed" and not entry.busy():
            entry = self.entries[name] = await asyncio.to_thread(self._describe, entry.path)
        await self.acquire(name)
        return self.entries[name]

    async def unload(self, name: str) -> Entry:
        """Unload a model now (admin): 409 while it is in use."""
        entry = self._entry(name)
        if entry.busy():
            raise ApiError(409, f"model '{name}' is in use ({entry.state}, {entry.view().running} rendering, "
                           f"{entry.view().waiting} waiting); unload it once it is idle", param="model",
                           code="model_busy")
        await self._unload(entry, "asked to")
        return entry

    async def unload_idle(self) -> list[str]:
        """Unload every loaded model that is idle (A1111's unload-checkpoint)."""
        unloaded = []
        for entry in list(self.entries.values()):
            if entry.queue is not None and not entry.busy():  # checked before each: a request may queue meanwhile
                unloaded.append(entry.name)
                await self._unload(entry, "asked to")
        return unloaded

    def _entry(self, name: str) -> Entry:
        entry = self.entries.get(name)
        if entry is None:
            raise ApiError(404, f"model '{name}' not found; available: {', '.join(sorted(self.entries)) or 'none'}",
                           param="model", code="model_not_found")
        return entry

    def _loading(self, entry: Entry) -> asyncio.Future[None]:
        """The model's load in progress, started if none is."""
        if entry.task is None:
            entry.state = "loading"
            entry.task = asyncio.ensure_future(self._load(entry))
            entry.task.add_done_callback(lambda _: setattr(entry, "task", None))
        return entry.task

    async def _load(self, entry: Entry) -> None:
        """Make room, load on a thread, measure; any failure is the model's (state `failed`), never raised."""
        started = time.perf_counter()
        try:
            if not await self._make_room(entry):
                entry.state = "available"  # every request for it went away while it waited for room
                return
            async with self._one_load:
                queue, grown = await asyncio.to_thread(self._open, entry.path)
        except ApiError as error:
            return self._failed(entry, error)
        except Exception as exc:  # any failure is this model's, never the loader's
            log.error("model %s failed to load: %s: %s", entry.name, type(exc).__name__, exc,
                      exc_info=not isinstance(exc, engines.EngineError))
            self.metrics.model_load_failures.labels(entry.name).inc()
            return self._failed(entry, ApiError(503, f"model '{entry.name}' failed to load: {type(exc).__name__}: "
                                                f"{exc}", code="model_load_failed", headers={"Retry-After": "10"}))
        entry.measured = max(entry.measured, grown)
        entry.queue, entry.state, entry.reserved, entry.info = queue, "loaded", False, queue.pipeline.info
        entry.last_used = time.monotonic()
        log.info("model %s ready on %s in %.1f s (%d MB)", entry.name, queue.pipeline.info.device,
                 time.perf_counter() - started, entry.size // 2**20)
        if self.max_bytes is not None and entry.size > self.max_bytes:
            await self._unload(entry, "it is larger than the memory budget")
            self._failed(entry, too_large(entry, self.max_bytes))
        elif self.entries.get(entry.name) is not entry:
            await self._unload(entry, "its folder was removed while it loaded")
        else:
            await self._shrink(keep=entry)

    def _open(self, path: Path) -> tuple[ModelQueue, int]:
        """Load a model (on a thread), with how much the resident memory grew meanwhile."""
        before = resident_bytes()
        queue = self.open_queue(path)
        after = resident_bytes()
        return queue, max(0, after - before) if before is not None and after is not None else 0

    def _failed(self, entry: Entry, error: ApiError) -> None:
        entry.state, entry.error, entry.reserved = "failed", error, False
        if error.code == "model_too_large":
            log.error("model %s not loaded: %s", entry.name, error.message)

    async def _make_room(self, entry: Entry) -> bool:
        """Reserve the model's room, unloading the least recently used idle models for it; while every loaded
        model is in use, wait (False when nobody waits for this model any more)."""
        if self.max_bytes is not None and entry.size > self.max_bytes:
            raise too_large(entry, self.max_bytes)
        while not self._fits(entry):
            idle = [e for e in self.entries.values() if e.state == "loaded" and e is not entry and not e.busy()]
            if idle:
                await self._unload(min(idle, key=lambda e: e.last_used), f"to make room for {entry.name}")
            elif entry.users == 0 and not self.preloading:
                return False
            else:
                await asyncio.sleep(ROOM_POLL)
        entry.reserved = True
        return True

    async def _shrink(self, keep: Entry) -> None:
        """A load measured larger than its estimate may leave the loaded models over the memory budget: unload
        idle ones until they fit."""
        def over() -> bool:
            return self.max_bytes is not None and sum(e.size for e in self.entries.values() if e.held) > self.max_bytes

        while over():
            idle = [e for e in self.entries.values() if e.state == "loaded" and e is not keep and not e.busy()]
            if not idle:
                log.warning("the loaded models take more than --max-loaded-bytes (the models in use stay loaded)")
                return
            await self._unload(min(idle, key=lambda e: e.last_used), "the loaded models are over the memory budget")

    async def _unload(self, entry: Entry, why: str) -> None:
        """Out of the cache at once (on the loop: no request can queue on it after this), then its threads end."""
        queue, entry.queue, entry.reserved = entry.queue, None, False
        if entry.state == "loaded":
            entry.state = "available"
        if queue is None:
            return
        log.info("model %s unloaded: %s", entry.name, why)
        await asyncio.to_thread(queue.close, CLOSE_WAIT)
        del queue
        await asyncio.to_thread(gc.collect)  # its sessions' memory goes back now, not at some later collection
