"""The router's watch over its nodes, once a second: expire lapsed leases, probe every remote node at once
(each within `probe_timeout`, so one node that accepts connections and never answers delays nobody),
take out the ones that fail, put back the ones that answer, and forget nodes silent for long.

Only this probe (or a registration's call-back) puts a node back in rotation: the router must have
reached the node itself. Run under `server.supervisor.supervise`, so an unexpected fault is logged and
the watch starts again.
"""

from __future__ import annotations

import asyncio
import logging
import time

from server.router.dispatch import Dispatcher
from server.router.registry import NodeRecord, Registry
from server.wire import NodeUnavailable

log = logging.getLogger("sdserve.router")
PROBE_SECONDS = 1.0
FORGET_AFTER = 20  # heartbeat timeouts of silence before a node is forgotten


class Prober:
    def __init__(self, registry: Registry, dispatcher: Dispatcher, timeout: float,
                 interval: float = PROBE_SECONDS) -> None:
        self.registry, self.dispatcher = registry, dispatcher
        self.timeout, self.interval = timeout, interval

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.round()

    async def round(self) -> None:
        for record in self.registry.expire_leases():
            log.warning("node %s: %s; its waiting requests go to other nodes", record.id, record.last_error)
        await self._forget_silent()
        remote = [r for r in self.registry.nodes.values() if not r.local and self.registry.alive(r)]
        outcomes = await asyncio.gather(*(self._probe(r) for r in remote), return_exceptions=True)
        for record, outcome in zip(remote, outcomes, strict=True):
            if isinstance(outcome, Exception):
                log.error("probing node %s failed unexpectedly", record.id, exc_info=outcome)
        if any(outcome is True for outcome in outcomes):
            await self.dispatcher.notify()
        self.dispatcher.count_healthy()
        self.dispatcher.check_default_model()

    async def _probe(self, record: NodeRecord) -> bool:
        """True when the node came back into rotation."""
        try:
            report = await record.transport.status(self.timeout)
        except NodeUnavailable as exc:
            if record.healthy:
                log.warning("node %s does not answer its probe (%s): out of rotation", record.id, exc)
                self.registry.mark_failed(record, f"probe: {exc}")
            else:
                record.last_error = f"probe: {exc}"
            return False
        if report.node_id != record.id:
            self.registry.mark_failed(record, f"{record.report.url} now answers as node {report.node_id}")
            return False
        if self.registry.restore(record, report):
            log.info("node %s answers again: back in rotation", record.id)
            return True
        return False

    async def _forget_silent(self) -> None:
        limit = FORGET_AFTER * self.registry.heartbeat_timeout
        for record in list(self.registry.nodes.values()):
            silent = time.monotonic() - record.last_seen
            if not record.local and silent > limit:
                log.info("forgetting node %s (silent for %.0f s)", record.id, silent)
                await self.registry.remove(record)
