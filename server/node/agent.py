"""The node role's side of the fleet: what it reports about itself, and the agent that keeps it
registered with each router (register, heartbeat, re-register after a router restart, deregister)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from functools import partial

import httpx
import msgspec

from engines.manifest import sdserve_version
from server.node.pool import EnginePool
from server.settings import Settings
from server.supervisor import supervise
from server.wire import ModelLoad, NodeReport, Registered

log = logging.getLogger("sdserve.node")


def advertise_url(settings: Settings) -> str:
    return (settings.advertise_url or f"http://{settings.host}:{settings.port}").rstrip("/")


def node_id(settings: Settings) -> str:
    """Stable across restarts: the configured id, or one derived from the advertised URL."""
    if settings.node_id:
        return settings.node_id
    return "node-" + hashlib.sha256(advertise_url(settings).encode()).hexdigest()[:10]


def node_report(pool: EnginePool, settings: Settings, identity: str, url: str) -> NodeReport:
    ready = pool.ready_models()
    load = {name: ModelLoad(**numbers) for name, numbers in pool.load().items()}
    # the backend and device at a glance: a loaded model's (one not loaded has only the backend asked for)
    first = next((q.pipeline.info for q in pool.queues.values()), None) or next(iter(ready.values()), None)
    return NodeReport(
        node_id=identity, url=url, version=sdserve_version(), models=list(ready.values()),
        loading=[name for name, state in pool.states.items() if state == "loading"],
        loaded=sorted(pool.queues), room_for=pool.cache.room_for(),
        backend=first.backend if first else "none", device=first.device if first else "none",
        render_slots=settings.render_slots, load=load, draining=pool.draining, sick=pool.sick(),
    )


class NodeAgent:
    """One registration loop per router. Heartbeats carry the full report, so routers always dispatch on
    current models and load; a router that forgot us (restart) answers 409 and we register again."""

    def __init__(self, settings: Settings, pool: EnginePool) -> None:
        self.settings, self.pool = settings, pool
        self.id, self.url = node_id(settings), advertise_url(settings)
        headers = {"authorization": f"Bearer {settings.node_token}"} if settings.node_token else {}
        self.http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(10.0, connect=settings.connect_timeout))
        self.leases: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [supervise(f"registration with {router}", partial(self._keep_registered, router.rstrip("/")))
                       for router in self.settings.routers]

    def report(self) -> NodeReport:
        return node_report(self.pool, self.settings, self.id, self.url)

    def beat_now(self) -> None:
        """Send the next heartbeats at once (e.g. to announce draining)."""
        self._wake.set()

    async def _keep_registered(self, router: str) -> None:
        while not self.pool.ready() and any(s == "loading" for s in self.pool.states.values()):
            await asyncio.sleep(0.2)  # register once there is something to serve
        while True:
            try:
                await (self._heartbeat(router) if router in self.leases else self._register(router))
            except httpx.HTTPError as exc:
                log.warning("router %s unreachable: %s", router, exc)
            # Until registered, retry soon: the router may still be starting, or we may not listen yet.
            interval = self.settings.heartbeat_interval
            wait = interval if router in self.leases else min(1.0, interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            self._wake.clear()

    async def _register(self, router: str) -> None:
        response = await self.http.post(f"{router}/v0/nodes/register", content=msgspec.json.encode(self.report()),
                                        headers={"content-type": "application/json"})
        if response.status_code != 200:
            log.error("router %s refused registration: %d %s", router, response.status_code, response.text[:300])
            return
        registered = msgspec.json.decode(response.content, type=Registered)
        self.leases[router] = registered.lease
        log.info("registered with router %s as %s (%s)", router, self.id, self.url)

    async def _heartbeat(self, router: str) -> None:
        headers = {"content-type": "application/json", "x-node-lease": self.leases[router]}
        response = await self.http.post(f"{router}/v0/nodes/{self.id}/heartbeat",
                                        content=msgspec.json.encode(self.report()), headers=headers)
        if response.status_code in (403, 409):  # the router restarted or replaced us: register again
            log.info("router %s does not know this node any more; registering again", router)
            del self.leases[router]
            await self._register(router)
        elif response.status_code != 200:
            log.warning("heartbeat to %s answered %d: %s", router, response.status_code, response.text[:300])

    async def stop(self) -> None:
        """Deregister from every router, then stop the loops."""
        for task in self._tasks:
            task.cancel()
        for router, lease in list(self.leases.items()):
            try:
                response = await self.http.delete(f"{router}/v0/nodes/{self.id}", headers={"x-node-lease": lease})
            except httpx.HTTPError as exc:
                log.warning("could not deregister from router %s (%s); it drops this node when its lease expires",
                            router, exc)
                continue
            if response.status_code == 200:
                log.info("deregistered from router %s", router)
            else:
                log.warning("router %s refused the deregistration: %d %s", router, response.status_code,
                            response.text[:300])
        await self.http.aclose()
