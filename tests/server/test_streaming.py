"""OpenAI image streaming with the stock `openai` SDK against a standalone server: partial and completed
events, the final image equal to a non-streamed render, edits, the async client, keep-alives, and a client
that leaves mid-render (its render is cancelled and its slot freed)."""

from __future__ import annotations

import asyncio
import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI, OpenAI
from PIL import Image

from tests.faults import StepGate
from tests.patience import PATIENCE, until
from tests.processes import ServerProcess

MODEL = "tiny-sd15"
BASE = {"model": MODEL, "size": "64x64"}


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_and_mask() -> tuple[bytes, bytes]:
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    image = png(pixels)
    pixels[16:48, 16:48, 3] = 0  # the transparent square is the area to edit
    return image, png(pixels)


def decoded(b64: str) -> Image.Image:
    picture = Image.open(io.BytesIO(base64.b64decode(b64)))
    picture.load()
    return picture


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> StepGate:
    return StepGate(tmp_path_factory.mktemp("gate"))


@pytest.fixture(scope="module")
def stream_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory, gate: StepGate
                  ) -> Iterator[ServerProcess]:
    """One render slot and no queue: a second request while one renders is refused (429), which makes
    "the slot is free again" observable without timing."""
    work = tmp_path_factory.mktemp("stream-server")
    process = ServerProcess("standalone", ["--models-dir", str(models_dir), "--model", MODEL, "--images-dir",
                                           str(work / "images"), "--queue-depth", "0", "--keepalive-interval",
                                           "0.05"], work, env=gate.env).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def sdk(stream_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{stream_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_generate_stream_partials_then_completed_equal_to_unstreamed(sdk: OpenAI) -> None:
    events = list(sdk.images.generate(prompt="a red kite", stream=True, partial_images=2, **BASE,
                                      extra_body={"seed": 11, "steps": 6}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for event in events:
        assert decoded(event.b64_json).size == (64, 64) and decoded(event.b64_json).format == "PNG"
        extra = event.model_dump()
        assert (extra["index"], extra["seed"], event.size, event.background) == (0, 11, "64x64", "opaque")
    assert events[0].b64_json != events[-1].b64_json  # an estimate mid-render, not the final image
    completed = events[-1]
    assert completed.usage.input_tokens == completed.usage.input_tokens_details.text_tokens > 0
    assert completed.usage.output_tokens == 0
    plain = sdk.images.generate(prompt="a red kite", response_format="b64_json", **BASE,
                                extra_body={"seed": 11, "steps": 6})
    assert base64.b64decode(plain.data[0].b64_json) == base64.b64decode(completed.b64_json)
    assert plain.model_dump()["background"] == "opaque" and plain.model_dump()["quality"] == "medium"


def test_n2_events_in_order_and_no_partials_when_zero(sdk: OpenAI) -> None:
    events = [e.model_dump() for e in sdk.images.generate(prompt="two boats", n=2, stream=True, partial_images=1,
                                                          **BASE, extra_body={"seed": 40, "steps": 4})]
    partials = [(e["index"], e["partial_image_index"]) for e in events if e["type"].endswith("partial_image")]
    completed = [(e["index"], e["seed"]) for e in events if e["type"].endswith("completed")]
    assert sorted(partials) == [(0, 0), (1, 0)] and partials == sorted(partials, key=lambda p: p[1])
    assert completed == [(0, 40), (1, 41)] and events[-1]["type"] == "image_generation.completed"
    only = [e.type for e in sdk.images.generate(prompt="two boats", n=2, stream=True, partial_images=0, **BASE,
                                                extra_body={"seed": 40, "steps": 4})]
    assert only == ["image_generation.completed"] * 2


def test_edit_stream_with_mask(sdk: OpenAI) -> None:
    image, mask = image_and_mask()
    events = list(sdk.images.edit(image=("in.png", image, "image/png"), mask=("mask.png", mask, "image/png"),
                                  prompt="a hat", stream=True, partial_images=2, **BASE,
                                  extra_body={"seed": 3, "steps": 6}))
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    plain = sdk.images.edit(image=("in.png", image, "image/png"), mask=("mask.png", mask, "image/png"),
                            prompt="a hat", response_format="b64_json", **BASE, extra_body={"seed": 3, "steps": 6})
    assert base64.b64decode(plain.data[0].b64_json) == base64.b64decode(events[-1].b64_json)


def test_async_client_streams(stream_server: ServerProcess) -> None:
    async def collect() -> list[str]:
        client = AsyncOpenAI(base_url=f"{stream_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        stream = await client.images.generate(prompt="a fox", stream=True, partial_images=1, **BASE,
                                              extra_body={"seed": 2, "steps": 3})
        types = [event.type async for event in stream]
        await client.close()
        return types

    assert asyncio.run(collect()) == ["image_generation.partial_image", "image_generation.completed"]


def test_errors_before_the_stream_are_plain_http(stream_server: ServerProcess) -> None:
    url = f"{stream_server.url}/v1/images/generations"
    for body, param, status in [({"partial_images": 4}, "partial_images", 400), ({"model": "nope"}, "model", 404),
                                ({"background": "transparent"}, "background", 400)]:
        response = httpx.post(url, json={"prompt": "x", "stream": True, **BASE, **body}, timeout=30)
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["error"]["param"] == param


def test_disconnect_after_first_event_cancels_and_frees_the_slot(stream_server: ServerProcess,
                                                                 gate: StepGate) -> None:
    """The first partial arrives while the render still runs (held after the next step, however fast the
    machine): the server's log shows the render cancelled at a step before the last, after the step of that
    partial; the slot is free for the next request."""
    url = f"{stream_server.url}/v1/images/generations"
    body = {"prompt": "a long render", "stream": True, "partial_images": 3, "steps": 100, "seed": 9, **BASE}
    lines: list[str] = []
    gate.hold(after_steps=26)
    try:
        cancelled = _leave_after_the_first_event(url, body, lines, stream_server)
    finally:
        gate.release()
    first_event = next(i for i, line in enumerate(lines) if line.startswith("event: "))
    assert all(line == ": keep-alive" for line in lines[:first_event] if line)  # only comments before it
    assert "image_generation.partial_image" in lines[-1]
    assert cancelled, stream_server.log()[-2000:]
    partial_step = int(re.search(r"at step (\d+)/100", stream_server.log_lines("leaver-1: partial image 0")[0])[1])
    step = int(re.search(r"cancelled at step (\d+)/100", cancelled[0])[1])
    assert partial_step == 25 and partial_step <= step < 100
    statuses = []  # the slot frees as the render thread leaves its step; no queue here: 429 till then
    until("the slot is free for the next request", lambda: statuses.append(httpx.post(
        url, json={**body, "stream": False, "steps": 1, "response_format": "b64_json"}, timeout=PATIENCE
    ).status_code) or statuses[-1] != 429)
    assert statuses[-1] == 200, statuses


def _leave_after_the_first_event(url: str, body: dict, lines: list[str], server: ServerProcess) -> list[str]:
    """Reads the stream up to its first event, hangs up; the log lines of the render's cancellation."""
    with httpx.stream("POST", url, json=body, headers={"x-request-id": "leaver-1"}, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith("data: "):
                break  # the first event: leave
    return server.log_lines("leaver-1 cancelled at step")


def test_json_edit_with_data_urls_equals_the_multipart_edit(sdk: OpenAI, stream_server: ServerProcess) -> None:
    image, mask = image_and_mask()
    url = f"{stream_server.url}/v1/images/edits"
    fields = {"prompt": "a hat", "seed": 8, "steps": 3, "response_format": "b64_json", **BASE}

    def data_url(data: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(data).decode()

    as_json = httpx.post(url, json={**fields, "images": [{"image_url": data_url(image)}],
                                    "mask": {"image_url": data_url(mask)}}, timeout=60)
    assert as_json.status_code == 200, as_json.text
    multipart = sdk.images.edit(image=("in.png", image, "image/png"), mask=("mask.png", mask, "image/png"),
                                prompt="a hat", response_format="b64_json", **BASE, extra_body={"seed": 8, "steps": 3})
    assert as_json.json()["data"][0]["b64_json"] == multipart.data[0].b64_json
    refusals = [({"images": [{"file_id": "file-123"}]}, "images"),
                ({"images": [{"image_url": "http://127.0.0.1:1/x.png"}]}, "images"),
                ({"images": [{"image_url": data_url(image)}], "mask": {"image_url": "https://10.0.0.1/m.png"}}, "mask"),
                ({"images": [{"image_url": "data:image/png;base64,@@@"}]}, "images"),
                ({"images": [{"image_url": data_url(image)}], "background": "transparent"}, "background")]
    for body, param in refusals:
        response = httpx.post(url, json={**fields, **body}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
