"""A real fleet on loopback for the router tests: one router and several nodes, each its own process,
each node optionally behind a `Proxy` (its advertised URL) that a test can make hang or refuse."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.patience import PATIENCE, until
from tests.processes import ServerProcess, free_port
from tests.router.proxy import Proxy

TOKEN = "fleet-token"
ADMIN = "admin-secret"
GEN = "/v1/images/generations"
ENV = {"SDSERVE_NODE_TOKEN": TOKEN, "SDSERVE_ADMIN_KEY": ADMIN}
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
NODE_HEADERS = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
LEASE = 4  # seconds: the router's heartbeat timeout, unless a fleet's router_args set another


class Fleet:
    def __init__(self, models_dir: Path, work: Path, router_args: list[str] | None = None,
                 node_args: list[str] | None = None) -> None:
        self.models_dir, self.work = models_dir, work
        self.node_args = node_args or ["--heartbeat-interval", "1"]
        self.router = ServerProcess("router", ["--images-dir", str(work / "images"), "--queue-depth", "200",
                                               "--heartbeat-timeout", str(LEASE), *(router_args or [])],
                                    work, env=ENV, name="router")
        self.nodes: dict[str, ServerProcess] = {}
        self.proxies: dict[str, Proxy] = {}

    def add_node(self, name: str, *models: str, extra: list[str] | None = None, port: int | None = None,
                 proxied: bool = False) -> ServerProcess:
        port = port or free_port()
        args = ["--models-dir", str(self.models_dir), "--router", self.router.url, "--node-id", name,
                "--queue-depth", "64", *self.node_args, *(extra or [])]
        if proxied:
            self.proxies[name] = Proxy(port).start()
            args += ["--advertise-url", self.proxies[name].url]
        for model in models:
            args += ["--model", model]
        process = ServerProcess("node", args, self.work, env=ENV, name=name, port=port)
        self.nodes[name] = process
        return process

    def start(self) -> Fleet:
        self.router.start(ready=False)
        for process in self.nodes.values():
            process.start(ready=False)
        self.wait_nodes(set(self.nodes))
        return self

    def views(self) -> dict[str, dict]:
        listing = httpx.get(self.router.url + "/v0/nodes", headers=ADMIN_HEADERS, timeout=PATIENCE).json()
        return {node["node_id"]: node for node in listing["data"]}

    def wait_nodes(self, names: set[str], state: str = "healthy") -> None:
        def there() -> bool:
            views = self.views()
            return all(name in views and views[name]["state"] == state and views[name]["models"] for name in names)
        try:
            until(f"nodes {names} {state}", there)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}: {self.views()}\n{self.router.log()[-3000:]}") from None

    def served(self, before: dict[str, dict]) -> dict[str, int]:
        """Requests each node was sent since `before` (a `views()`)."""
        return {name: view["requests"] - before.get(name, {}).get("requests", 0) for name, view in self.views().items()}

    def stop(self) -> None:
        for process in [*self.nodes.values(), self.router]:
            process.kill()
        for proxy in self.proxies.values():
            proxy.stop()


async def generate_many(url: str, count: int, body: dict,
                        timeout: float = PATIENCE) -> list[httpx.Response | Exception]:
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=None)) as client:
        tasks = [client.post(GEN, json=body) for _ in range(count)]
        return await asyncio.gather(*tasks, return_exceptions=True)


def statuses(responses: list[httpx.Response | Exception]) -> list[int | str]:
    return [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in responses]
