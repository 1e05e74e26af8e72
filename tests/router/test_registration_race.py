"""Two registrations of one node id at the same time, while the id's old holder hangs: the one that lands
last replaces the other, which is retired (its waiting requests go elsewhere, its client is closed)
instead of being left behind, unretired, with an open client."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from server.router.admission import admit
from server.router.node_client import NodeClient
from server.router.registry import Registry
from server.settings import Settings
from tests.processes import ServerProcess
from tests.router.fleet import ENV, TOKEN
from tests.router.proxy import Proxy


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, list[Proxy]]]:
    """One node (no models, no reachable router) behind three proxies: three URLs that answer as it."""
    work = tmp_path_factory.mktemp("twin")
    (work / "models").mkdir()
    node = ServerProcess("node", ["--models-dir", str(work / "models"), "--router", "http://127.0.0.1:9",
                                  "--node-id", "twin"], work, env=ENV, name="twin").start(ready=False)
    proxies = [Proxy(node.port).start() for _ in range(3)]
    try:
        yield node, proxies
    finally:
        for proxy in proxies:
            proxy.stop()
        node.kill()


def test_concurrent_registrations_retire_the_one_replaced(twin: tuple[ServerProcess, list[Proxy]],
                                                          tmp_path: Path) -> None:
    node, (old, first, second) = twin
    settings = Settings(role="router", node_token=TOKEN, probe_timeout=1.0, images_dir=str(tmp_path / "images"))
    registry = Registry(heartbeat_timeout=15)

    async def main() -> None:
        client = NodeClient(node.url, TOKEN, 3, 30)
        report = await client.status(5)
        await client.close()
        at = {proxy: msgspec.structs.replace(report, url=proxy.url) for proxy in (old, first, second)}
        holder = await admit(at[old], settings, registry)
        old.set("hang")  # both new registrations now wait a whole probe for the old holder, side by side
        a, b = await asyncio.gather(admit(at[first], settings, registry), admit(at[second], settings, registry))
        current = registry.nodes["twin"]
        assert current in (a, b) and holder.retired
        replaced = a if current is b else b
        assert replaced.retired and replaced.lost.is_set() and not current.retired
        assert replaced.transport.http.is_closed and not current.transport.http.is_closed
        await current.transport.close()

    asyncio.run(main())
