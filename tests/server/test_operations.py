"""Operating behaviour: bounded queues, a responsive loop, timeouts, cancellation, expiry, metrics, keys."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import AuthenticationError, OpenAI
from PIL import Image

from tests.faults import StepGate
from tests.patience import PATIENCE, until
from tests.processes import ServerProcess

GEN = "/v1/images/generations"
IMAGE_TTL = 10  # seconds: the first fetch comes right after the answer, in time on a loaded machine too


def metric(server: ServerProcess, name: str, labels: str = "") -> float:
    text = httpx.get(server.url + "/metrics", timeout=PATIENCE).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until_idle(server: ServerProcess, labels: str = "") -> None:
    """Until no render runs or waits (matching `labels`): a shared server's earlier tests may have left
    renders their clients gave up on, which stop only at their next step."""
    busy = ("sdserve_renders_in_flight", "sdserve_queue_depth")
    until("earlier renders leave the server", lambda: not any(metric(server, name, labels) for name in busy))


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> StepGate:
    return StepGate(tmp_path_factory.mktemp("gate"))


@pytest.fixture(scope="module")
def small_queue(models_dir: Path, tmp_path_factory: pytest.TempPathFactory, gate: StepGate
                ) -> Iterator[ServerProcess]:
    """Renders time out only past the tests' patience: a held render waits for its test, however slow."""
    work = tmp_path_factory.mktemp("small-queue")
    process = ServerProcess("standalone", ["--models-dir", str(models_dir), "--model", "tiny-sd15",
                                           "--images-dir", str(work / "images"), "--queue-depth", "4",
                                           "--request-timeout", str(2 * PATIENCE), "--image-ttl", str(IMAGE_TTL)],
                            work, env=gate.env).start()
    yield process
    process.stop()


def test_concurrent_requests_get_200_or_429_and_health_answers_while_a_render_runs(small_queue: ServerProcess,
                                                                                    gate: StepGate) -> None:
    """Twenty at once on one render slot and four places in the queue, the first render held mid-way: exactly
    five are taken (one rendering, four waiting), fifteen refused at once with 429 and Retry-After, and
    /healthz answers while the render runs; released, the five answer with their images."""
    wait_until_idle(small_queue)
    body = {"prompt": "a busy street", "size": "64x64", "steps": 2, "response_format": "b64_json"}

    async def scenario() -> tuple[list[httpx.Response], list[int]]:
        async with httpx.AsyncClient(base_url=small_queue.url, timeout=PATIENCE) as client:
            renders = [asyncio.create_task(client.post(GEN, json=body)) for _ in range(20)]
            await asyncio.to_thread(gate.wait_held)
            # the refusals come at once, while the render is held
            await asyncio.to_thread(until, "fifteen answers", lambda: sum(task.done() for task in renders) >= 15)
            health = [(await client.get("/healthz")).status_code for _ in range(3)]
            assert metric(small_queue, "sdserve_renders_in_flight") == 1  # still held mid-render
            gate.release()
            return [await task for task in renders], health

    gate.hold()
    try:
        responses, health = asyncio.run(scenario())
    finally:
        gate.release()
    statuses = [r.status_code for r in responses]
    assert sorted(statuses) == [200] * 5 + [429] * 15, statuses
    for response in responses:
        if response.status_code == 200:
            image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
            assert image.size == (64, 64)
        else:
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["type"] == "rate_limit_error"
    assert health == [200, 200, 200]


@pytest.fixture(scope="module")
def impatient(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A 50 ms request timeout: shorter than any render of ten 512×512 images on any hardware (encoding
    ten PNGs alone takes longer), so the 504 does not depend on how fast the machine is."""
    work = tmp_path_factory.mktemp("impatient")
    process = ServerProcess("standalone", ["--models-dir", str(models_dir), "--model", "tiny-sd15",
                                           "--images-dir", str(work / "images"), "--request-timeout", "0.05"],
                            work).start()
    yield process
    process.stop()


def test_render_over_the_timeout_is_504_and_the_queue_recovers(impatient: ServerProcess) -> None:
    response = httpx.post(impatient.url + GEN, timeout=PATIENCE,
                          json={"prompt": "slow", "size": "512x512", "steps": 150, "n": 10})
    assert response.status_code == 504, response.text
    assert response.json()["error"]["type"] == "server_error" and response.json()["error"]["code"] == "timeout"
    wait_until_idle(impatient)  # the render stopped at its next step
    assert metric(impatient, "sdserve_queue_depth") == 0


def test_client_disconnect_cancels_the_render(small_queue: ServerProcess, gate: StepGate) -> None:
    """A 150-step render is held after its first step; its client hangs up: the render stops at that step,
    never running on to its 150th (the request timeout is far off: nothing else would stop it)."""
    wait_until_idle(small_queue)
    body = b'{"prompt": "abandoned", "size": "64x64", "steps": 150}'
    gate.hold()
    try:
        with socket.create_connection(("127.0.0.1", small_queue.port)) as sock:
            sock.sendall(b"POST " + GEN.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"x-request-id: abandoned-7\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert gate.wait_held() == ["1/150"]
        cancelled = small_queue.log_lines("request abandoned-7 cancelled at step")  # this request's render
    finally:
        gate.release()
    assert cancelled and "cancelled at step 1/150" in cancelled[0], small_queue.log()[-2000:]
    wait_until_idle(small_queue)


def test_expired_images_are_404(small_queue: ServerProcess) -> None:
    response = httpx.post(small_queue.url + GEN, json={"prompt": "brief", "size": "64x64", "steps": 1},
                          timeout=PATIENCE)
    url = response.json()["data"][0]["url"]
    assert re.search(r"/v1/images/files/[A-Za-z0-9_-]{32}\.png$", url)
    assert httpx.get(url).status_code == 200
    until("the image expires", lambda: httpx.get(url).status_code != 200, IMAGE_TTL + PATIENCE)
    expired = httpx.get(url)
    assert expired.status_code == 404
    assert expired.json()["error"]["code"] == "image_not_found"


def test_metrics_move(small_queue: ServerProcess) -> None:
    before_images = metric(small_queue, "sdserve_images_total", 'model="tiny-sd15"')
    before_requests = metric(small_queue, "sdserve_requests_total", 'status="200"')
    before_renders = metric(small_queue, "sdserve_render_seconds_count", 'model="tiny-sd15"')
    httpx.post(small_queue.url + GEN, json={"prompt": "count me", "size": "64x64", "steps": 1, "n": 2},
               timeout=PATIENCE)
    assert metric(small_queue, "sdserve_images_total", 'model="tiny-sd15"') == before_images + 2
    assert metric(small_queue, "sdserve_requests_total", 'status="200"') > before_requests
    assert metric(small_queue, "sdserve_render_seconds_count", 'model="tiny-sd15"') == before_renders + 1
    text = httpx.get(small_queue.url + "/metrics").text
    for name in ("sdserve_queue_depth", "sdserve_renders_in_flight", "sdserve_render_seconds_bucket"):
        assert name in text


def test_access_log_has_one_line_per_request(small_queue: ServerProcess) -> None:
    httpx.post(small_queue.url + GEN, headers={"x-request-id": "log-me-42"},
               json={"prompt": "logged", "size": "64x64", "steps": 1}, timeout=60)
    lines = small_queue.log_lines("log-me-42", "sdserve.access")
    assert len(lines) == 1
    assert "POST /v1/images/generations 200 model=tiny-sd15" in lines[0]


@pytest.fixture(scope="module")
def keyed(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("keyed")
    keys_file = work / "keys.txt"
    keys_file.write_text("# one per line\nkey-from-file\n")
    process = ServerProcess("standalone", ["--models-dir", str(models_dir), "--model", "tiny-sd15",
                                           "--images-dir", str(work / "images"), "--api-keys-file", str(keys_file)],
                            work, env={"SDSERVE_API_KEYS": "alpha-key,beta-key"}).start()
    yield process
    process.stop()


def test_api_keys(keyed: ServerProcess) -> None:
    body = {"prompt": "secret", "size": "64x64", "steps": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic alpha-key"},
                    {"Authorization": "Bearer alpha"}):
        response = httpx.post(keyed.url + GEN, json=body, headers=headers, timeout=60)
        assert response.status_code == 401, headers
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and set(error) == {"message", "type", "param", "code"}
    assert httpx.get(keyed.url + "/v1/models").status_code == 401
    # An API key is not an admin key: with keys configured and no admin key, the admin routes are closed.
    for headers in ({}, {"Authorization": "Bearer alpha-key"}):
        nodes = httpx.get(keyed.url + "/v0/nodes", headers=headers)
        assert nodes.status_code == 401 and nodes.json()["error"]["type"] == "authentication_error"
    for key in ("alpha-key", "beta-key", "key-from-file"):
        response = httpx.post(keyed.url + GEN, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert response.status_code == 200, key
    # Image URLs are capabilities: downloadable without the key, like OpenAI's.
    assert httpx.get(response.json()["data"][0]["url"]).status_code == 200
    assert httpx.get(keyed.url + "/healthz").status_code == 200
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0).images.generate(prompt="x")
    ok = OpenAI(base_url=keyed.url + "/v1", api_key="beta-key", max_retries=0).images.generate(
        prompt="x", size="64x64", extra_body={"steps": 1})
    assert ok.data[0].url
    assert "alpha-key" not in keyed.log()  # secrets are masked in the logged settings
