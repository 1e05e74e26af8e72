"""Streaming through a router with two nodes: the stock `openai` SDK sees the same events as from a
standalone server; a node that dies mid-stream ends the stream with an `error` event, never a hang; a node
that is dead before the stream starts is replaced by the other one."""

from __future__ import annotations

import base64
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.faults import StepGate
from tests.patience import PATIENCE, until
from tests.router.fleet import Fleet

BASE = {"model": "tiny-sd15", "size": "64x64"}


@pytest.fixture(scope="module")
def gate_b(tmp_path_factory: pytest.TempPathFactory) -> StepGate:
    """Holds node-b's renders."""
    return StepGate(tmp_path_factory.mktemp("gate-b"))


@pytest.fixture(scope="module")
def pair(models_dir: Path, tmp_path_factory: pytest.TempPathFactory, gate_b: StepGate) -> Iterator[Fleet]:
    fleet = Fleet(models_dir, tmp_path_factory.mktemp("stream-fleet"))
    for name in ("node-a", "node-b"):
        fleet.add_node(name, "tiny-sd15", extra=["--keepalive-interval", "0.02"])
    fleet.nodes["node-b"].env.update(gate_b.env)
    yield fleet.start()
    gate_b.release()
    fleet.stop()


@pytest.fixture(scope="module")
def sdk(pair: Fleet) -> OpenAI:
    return OpenAI(base_url=f"{pair.router.url}/v1", api_key="unused", max_retries=0, timeout=PATIENCE)


def test_stream_through_the_router(sdk: OpenAI) -> None:
    events = list(sdk.images.generate(prompt="a harbour", stream=True, partial_images=2, n=2, **BASE,
                                      extra_body={"seed": 21, "steps": 6}))
    kinds = [(e.type.split(".")[1], e.model_dump()["index"]) for e in events]
    assert kinds[-2:] == [("completed", 0), ("completed", 1)]
    assert sorted(kinds[:-2]) == [("partial_image", 0)] * 2 + [("partial_image", 1)] * 2
    plain = sdk.images.generate(prompt="a harbour", n=2, response_format="b64_json", **BASE,
                                extra_body={"seed": 21, "steps": 6})
    assert [base64.b64decode(d.b64_json) for d in plain.data] == [base64.b64decode(e.b64_json) for e in events[-2:]]
    image = base64.b64decode(plain.data[0].b64_json)
    edits = list(sdk.images.edit(image=("in.png", image, "image/png"), prompt="at night", stream=True,
                                 partial_images=1, **BASE, extra_body={"seed": 1, "steps": 4}))
    assert [e.type for e in edits] == ["image_edit.partial_image", "image_edit.completed"]


def test_unbuffered_keepalive_reaches_the_client_through_the_router(pair: Fleet) -> None:
    """A comment frame written by the node during a long silence arrives before the render's only event.
    The silence is 150 guided steps and a decode at 256x256 against a 20 ms keep-alive: longer than that on
    any hardware (300 sequential UNet calls), so the order does not depend on this machine's speed."""
    body = {"prompt": "silence", "stream": True, "partial_images": 0, "steps": 150, "seed": 1,
            "model": "tiny-sd15", "size": "256x256"}
    with httpx.stream("POST", f"{pair.router.url}/v1/images/generations", json=body, timeout=PATIENCE) as response:
        assert response.status_code == 200
        first = next(line for line in response.iter_lines() if line)
    assert first == ": keep-alive"


def test_node_dead_before_the_first_event_is_replaced(pair: Fleet, sdk: OpenAI, gate_b: StepGate) -> None:
    """A burst of streams is spread over both nodes by outstanding work; node-b holds its renders before
    their first event (a step gate), then hangs (SIGSTOP): the router replaces it once it is lost, and every
    client still gets its events from node-a."""
    until("fresh heartbeats say both nodes are idle",
          lambda: not any(load["work"] for view in pair.views().values() for load in view["load"].values()))

    def stream(seed: int) -> list[str]:
        return [e.type for e in sdk.images.generate(prompt="retry me", stream=True, partial_images=1, **BASE,
                                                    extra_body={"seed": seed, "steps": 2})]

    gate_b.hold()
    try:
        with ThreadPoolExecutor(4) as pool:
            streams = pool.map(stream, range(4))
            gate_b.wait_held()  # sent to node-b, which has sent no event yet
            pair.nodes["node-b"].signal(signal.SIGSTOP)
            results = list(streams)
    finally:
        gate_b.release()
        pair.nodes["node-b"].kill()
    assert results == [["image_generation.partial_image", "image_generation.completed"]] * 4
    # node-b had accepted them (keep-alives only, no event): the router reopened them on node-a
    assert pair.router.log_lines("node node-b failed", timeout=0), pair.router.log()[-2000:]


def test_node_dying_mid_stream_gives_an_error_event(pair: Fleet, sdk: OpenAI) -> None:
    stream = sdk.images.generate(prompt="a long one", stream=True, partial_images=3, **BASE,
                                 extra_body={"seed": 5, "steps": 100}, extra_headers={"x-request-id": "doomed-1"})
    events = iter(stream)
    assert next(events).type == "image_generation.partial_image"
    assert "doomed-1" in pair.nodes["node-a"].log()  # the only node left
    pair.nodes["node-a"].kill()
    with pytest.raises(openai.APIError, match="node rendering this stream failed"):
        for _ in events:
            pass
