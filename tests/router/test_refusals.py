"""A node that refuses a new job (503 while draining, or its listener closed while it shuts down) finishes the
requests it already has: only a node that hangs or breaks connections has its requests re-dispatched."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest

from server.errors import ApiError
from server.metrics import Metrics
from server.router.dispatch import Dispatcher
from server.router.node_client import NodeClient
from server.router.registry import Registry
from server.wire import RenderOrder
from tests.processes import ServerProcess, free_port
from tests.router.fleet import TOKEN


def order(request_id: str, steps: int, size: int, n: int = 1) -> RenderOrder:
    return RenderOrder(request_id=request_id, model="tiny-sd15", prompt="p", negative_prompt=None, width=size,
                     height=size, steps=steps, guidance_scale=7.5, sampler="euler", seed=1, n=n, strength=1.0)


def test_a_draining_nodes_refusal_does_not_abandon_its_running_request(models_dir: Path, tmp_path: Path) -> None:
    """The router's real dispatcher and node client against a real node (registered by hand, so the router
    cannot learn of the drain from a heartbeat first): a long render runs on the node, the node gets SIGTERM
    (it refuses new work, closes its listener and drains for up to 60 s), a second job is refused. The first
    still answers with its image."""
    nowhere = f"http://127.0.0.1:{free_port()}"  # the node's own registrations go nowhere: no heartbeats
    node = ServerProcess("node", ["--models-dir", str(models_dir), "--model", "tiny-sd15", "--router", nowhere,
                                  "--drain-timeout", "60"], tmp_path, env={"SDSERVE_NODE_TOKEN": TOKEN}).start()

    def status() -> dict:
        return httpx.get(node.url + "/v0/status", headers={"authorization": f"Bearer {TOKEN}"}, timeout=5).json()

    async def scenario() -> tuple[object, object]:
        client = NodeClient(node.url, TOKEN, connect_timeout=3, render_timeout=120)
        registry = Registry(heartbeat_timeout=600)
        registry.register(await client.status(5), client)
        dispatcher = Dispatcher(registry, Metrics(), retries=2, wait_limit=0)
        long = asyncio.create_task(dispatcher.render(order("long-1", 150, 512, n=2)))
        deadline = time.monotonic() + 30
        while not status()["load"]["tiny-sd15"]["running"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        node.signal(signal.SIGTERM)
        while time.monotonic() < deadline:  # draining, and soon its listener closes
            try:
                if status()["draining"]:
                    break
            except httpx.ConnectError:
                break
            await asyncio.sleep(0.02)
        refused: object
        try:
            refused = await dispatcher.render(order("late-1", 2, 64))
        except ApiError as exc:
            refused = exc
        return await asyncio.gather(long, return_exceptions=True), refused

    try:
        (first,), refused = asyncio.run(scenario())
    finally:
        node.kill()
    assert isinstance(refused, ApiError) and refused.status == 503, refused  # no other node to take it
    if isinstance(first, BaseException):
        pytest.fail(f"the running request was abandoned: {first!r}")
    assert len(first.images) == 2
