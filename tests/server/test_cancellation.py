"""A render whose request goes away (a closed stream, a client's timeout, the server's 504, an A1111
interrupt) stops quietly: the server logs one line that it was cancelled, never an asyncio complaint
("Future exception was never retrieved") or a traceback that an operator would read as a crash. With
batching off and on. Each render is held paused (a step gate) until it is cancelled, so this holds on any
machine."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults import StepGate
from tests.processes import ServerProcess

GEN = "/v1/images/generations"
TIMEOUT = 5  # the server's request timeout: what the 504 case waits for
BODY = {"prompt": "a lighthouse", "size": "64x64", "steps": 4}


@pytest.fixture(scope="module", params=["unbatched", "batched"])
def gated(request: pytest.FixtureRequest, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[ServerProcess, StepGate]]:
    work = tmp_path_factory.mktemp(f"cancel-{request.param}")
    gate = StepGate(work / "gate")
    gate.collect_garbage()
    batching = ["--batch-window", "5", "--max-batch", "4"] if request.param == "batched" else []
    process = ServerProcess("standalone", ["--models-dir", str(models_dir), "--model", "tiny-sd15",
                                           "--images-dir", str(work / "images"), "--request-timeout", str(TIMEOUT),
                                           *batching], work, env=gate.env).start()
    yield process, gate
    process.stop()


def _closed_stream(url: str, request_id: str, gate: StepGate) -> None:
    with httpx.stream("POST", url + GEN, json={**BODY, "stream": True}, headers={"x-request-id": request_id},
                      timeout=60) as response:
        assert response.status_code == 200
        gate.wait_held()
    # leaving the block closes the stream mid-render


def _client_gone(url: str, request_id: str, gate: StepGate) -> None:
    """A client that times out closes its connection (httpx, the OpenAI SDK): the server sees it leave."""
    body = json.dumps(BODY).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST {GEN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"x-request-id: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        gate.wait_held()


def _server_timeout(url: str, request_id: str, gate: StepGate) -> None:
    response = httpx.post(url + GEN, json=BODY, headers={"x-request-id": request_id}, timeout=60)
    assert response.status_code == 504, response.text
    assert gate.held()


def _a1111_interrupt(url: str, request_id: str, gate: StepGate) -> None:
    outcome: dict[str, httpx.Response] = {}
    body = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4}
    worker = threading.Thread(target=lambda: outcome.update(reply=httpx.post(
        url + "/sdapi/v1/txt2img", json=body, headers={"x-request-id": request_id}, timeout=60)))
    worker.start()
    gate.wait_held()
    assert httpx.post(url + "/sdapi/v1/interrupt", timeout=30).status_code == 200
    worker.join(60)
    assert outcome["reply"].status_code == 200, outcome["reply"].text


CANCELS: dict[str, Callable[[str, str, StepGate], None]] = {
    "closed stream": _closed_stream,
    "client gone (its timeout)": _client_gone,
    "server timeout (504)": _server_timeout,
    "A1111 interrupt": _a1111_interrupt,
}


@pytest.mark.parametrize("how", CANCELS)
def test_a_cancelled_render_leaves_no_complaint_in_the_log(gated: tuple[ServerProcess, StepGate], how: str) -> None:
    server, gate = gated
    before = len(server.log())
    request_id = "cancel-" + how.split()[0].lower()
    gate.hold()
    try:
        CANCELS[how](server.url, request_id, gate)
        assert gate.held(), "the render never ran"
    finally:
        gate.release()
    # the render thread saw the cancellation; a next render (collecting garbage at each step) proves the
    # server went on, and makes asyncio report any exception left unread
    assert server.log_lines(f"request {request_id} cancelled", timeout=30)
    after = httpx.post(server.url + GEN, json={**BODY, "steps": 2}, timeout=60)
    assert after.status_code == 200, after.text
    log = server.log()[before:]
    for complaint in ("never retrieved", "Traceback", "Exception in ASGI", "ERROR"):
        assert complaint not in log, log
