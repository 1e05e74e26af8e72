"""A node that refuses a new job (503 while draining, or its listener closed while it shuts down) finishes the
requests it already has: only a node that hangs or breaks connections has its requests re-dispatched."""

from __future__ import annotations

import asyncio
import math
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.errors import ApiError
from server.metrics import Metrics
from server.router.dispatch import Dispatcher
from server.router.node_client import NodeClient
from server.router.registry import Registry
from server.wire import RenderOrder
from tests.faults import StepGate
from tests.patience import PATIENCE, until
from tests.processes import ServerProcess, free_port
from tests.router.fleet import GEN, TOKEN, Fleet


def order(request_id: str, steps: int, size: int, n: int = 1) -> RenderOrder:
    return RenderOrder(request_id=request_id, model="tiny-sd15", prompt="p", negative_prompt=None, width=size,
                     height=size, steps=steps, guidance_scale=7.5, sampler="euler", seed=1, n=n, strength=1.0)


def _node(models_dir: Path, work: Path, gate: StepGate | None, drain_timeout: float, name: str) -> ServerProcess:
    """A node whose own registrations go nowhere (no heartbeats): the test registers it by hand, so the router
    cannot learn of a drain from a heartbeat first."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    env = {"SDSERVE_NODE_TOKEN": TOKEN, **(gate.env if gate else {})}
    return ServerProcess("node", ["--models-dir", str(models_dir), "--model", "tiny-sd15", "--router", nowhere,
                                  "--drain-timeout", str(drain_timeout)], work, env=env, name=name).start()


def _wait_refusing(node: ServerProcess) -> None:
    """Until the node reports draining, or its listener has closed."""
    def refusing() -> bool:
        try:
            status = httpx.get(node.url + "/v0/status", headers={"authorization": f"Bearer {TOKEN}"},
                               timeout=PATIENCE)
            return status.json()["draining"]
        except httpx.ConnectError:
            return True
    until(f"{node.name} starts draining", refusing)


async def _registered(registry: Registry, node: ServerProcess) -> None:
    client = NodeClient(node.url, TOKEN, connect_timeout=3, render_timeout=120)
    registry.register(await client.status(5), client)


async def _held(node: ServerProcess, gate: StepGate, request_id: str) -> tuple[Dispatcher, asyncio.Task]:
    """A dispatcher with `node` registered, and a render it sent there, held paused after its first step."""
    registry = Registry(heartbeat_timeout=600)
    await _registered(registry, node)
    dispatcher = Dispatcher(registry, Metrics(), retries=2, wait_limit=0)
    gate.hold()
    running = asyncio.create_task(dispatcher.render(order(request_id, 4, 64, n=2)))
    await asyncio.to_thread(gate.wait_held)
    return dispatcher, running


def test_a_draining_nodes_refusal_does_not_abandon_its_running_request(models_dir: Path, tmp_path: Path) -> None:
    """The router's real dispatcher and node client against a real node: a render is paused mid-way on the
    node, the node gets SIGTERM (it refuses new work, closes its listener and drains for up to 60 s), a second
    job is refused. Released, the first still answers with its image."""
    gate = StepGate(tmp_path / "gate")
    node = _node(models_dir, tmp_path, gate, 60, "node")

    async def scenario() -> tuple[object, object]:
        dispatcher, running = await _held(node, gate, "long-1")
        node.signal(signal.SIGTERM)
        await asyncio.to_thread(_wait_refusing, node)
        refused: object
        try:
            refused = await dispatcher.render(order("late-1", 2, 64))
        except ApiError as exc:
            refused = exc
        gate.release()
        return await asyncio.gather(running, return_exceptions=True), refused

    try:
        (first,), refused = asyncio.run(scenario())
        assert node.process.wait(60) == 0
    finally:
        node.kill()
    assert isinstance(refused, ApiError) and refused.status == 503, refused  # no other node to take it
    if isinstance(first, BaseException):
        pytest.fail(f"the running request was abandoned: {first!r}")
    assert len(first.images) == 2
    assert node.log_lines("draining", "1 running")  # the node says what it waits for


def test_a_render_outlasting_the_drain_timeout_is_answered_503_and_sent_elsewhere(models_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """A render still running when its node's drain timeout ends is answered 503 `draining` with an OpenAI
    error body (never the bare 500 of a cancelled request), so the router sends it to another node and the
    client gets its image. The render is held paused until then, so this holds on any machine."""
    gate = StepGate(tmp_path / "gate")
    draining = _node(models_dir, tmp_path, gate, 1, "draining")
    other = _node(models_dir, tmp_path, None, 60, "other")

    async def scenario() -> object:
        dispatcher, running = await _held(draining, gate, "long-2")
        await _registered(dispatcher.registry, other)
        draining.signal(signal.SIGTERM)
        (outcome,) = await asyncio.gather(running, return_exceptions=True)
        return outcome

    try:
        outcome = asyncio.run(scenario())
        assert draining.process.wait(60) == 0
    finally:
        draining.kill()
        other.kill()
    if isinstance(outcome, BaseException):
        pytest.fail(f"the request was not re-dispatched: {outcome!r}\n{draining.log()[-3000:]}")
    assert len(outcome.images) == 2
    assert other.log_lines("long-2 POST /v0/render 200")
    assert draining.log_lines("long-2 POST /v0/render 503")
    assert draining.log_lines("drain timeout", "1 render")
    assert "Traceback" not in draining.log() and "Exception in ASGI" not in draining.log()


def test_a_full_fleet_answers_429_with_the_nodes_estimate_and_a_stopping_router_answers_503(
        models_dir: Path, tmp_path: Path) -> None:
    """A node's only place is taken by a 40-step render (every step at least 0.2 s, held after its 3rd) and the
    router queues nothing (--queue-depth 0): the next request is 429, its Retry-After the node's estimate of
    the 37 steps left (less the age of its report), its message about the fleet. Then the router is stopped
    with the render still held: past its --drain-timeout the request still gets an OpenAI-shaped 503, never
    uvicorn's bare 500."""
    gate, step = StepGate(tmp_path / "gate"), 0.2
    fleet = Fleet(models_dir, tmp_path, router_args=["--queue-depth", "0", "--drain-timeout", "1"])
    node = fleet.add_node("only", "tiny-sd15", extra=["--queue-depth", "0", "--heartbeat-interval", "0.5"])
    node.env.update(gate.env)
    body = {"model": "tiny-sd15", "prompt": "long", "size": "64x64", "steps": 40, "response_format": "b64_json"}
    gate.slow(step)
    gate.hold(after_steps=3)
    try:
        fleet.start()
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(httpx.post, fleet.router.url + GEN, json=body, timeout=PATIENCE)
            gate.wait_held()
            estimate = math.ceil(37 * step)  # what the node reports while the render is held (it steps no more)
            until("a heartbeat carries the estimate made while it runs",
                  lambda: fleet.views()["only"]["load"]["tiny-sd15"]["retry_after"] >= estimate)
            looked, age = time.monotonic(), fleet.views()["only"]["last_heartbeat_seconds"]
            refused = httpx.post(fleet.router.url + GEN, json={**body, "steps": 1}, timeout=PATIENCE)
            # the router tells the estimate less the report's age: at most its age then, and the time since
            least = estimate - math.ceil(age + time.monotonic() - looked)
            fleet.router.signal(signal.SIGTERM)
            stopped = running.result(PATIENCE)
    finally:
        gate.release()
        fleet.stop()
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= least
    message = refused.json()["error"]["message"]
    assert message.startswith("every node serving 'tiny-sd15' is busy"), message
    assert stopped.status_code == 503, stopped.text
    assert stopped.json()["error"]["code"] == "shutting_down" and stopped.headers["retry-after"]
