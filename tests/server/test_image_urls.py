"""http(s) image URLs in JSON edits: off by default; where enabled, fetched with the upload limit, one deadline,
same-host redirects only, and never from loopback, link-local, private or reserved addresses unless allowed.

Traffic goes to loopback only: the image origin listens on 127.0.0.2 (the one address the fetching server
allows), and every other address in these tests must be refused before a connection is tried.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import httpx
import pytest

from server.errors import ApiError
from server.openai import fetch
from server.settings import Settings
from tests.patience import PATIENCE, until
from tests.processes import ServerProcess
from tests.server.test_streaming import image_and_mask

ORIGIN_HOST = "127.0.0.2"
LIMIT = 100_000  # --max-upload-bytes of the fetching server
TIMEOUT = PATIENCE / 20  # --fetch-timeout: a small image on loopback comes well within it on a loaded machine
IMAGE, MASK = image_and_mask()
FIELDS = {"prompt": "a hat", "model": "tiny-sd15", "size": "64x64", "seed": 8, "steps": 2,
          "response_format": "b64_json"}


class Origin(BaseHTTPRequestHandler):
    """The image server a client points at: images, oversize and slow bodies, redirects."""

    seen: list[tuple[str, str]]  # (path, Host header) of every request
    hung_up: list[str]  # the paths of trickled bodies whose client hung up before the origin gave up

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Host", "")))
        port = self.server.server_address[1]
        if self.path in ("/in.png", "/mask.png"):
            self._send(200, IMAGE if self.path == "/in.png" else MASK)
        elif self.path == "/big-declared":
            self._send(200, b"\0" * (LIMIT + 1))
        elif self.path == "/big-streamed":  # no length: the body would end when the connection closes
            self.send_response(200)
            self.end_headers()
            self._trickle(b"\0" * 8192, pause=0.0)
        elif self.path == "/slow":  # a byte every 0.1 s: no single read waits long, the whole takes 100 s
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self._trickle(b"\0", pause=0.1)
        elif self.path.startswith("/redirect"):
            target = {"/redirect-same": "/mask.png", "/redirect-loop": "/redirect-loop",
                      "/redirect-other": f"http://127.0.0.3:{port}/in.png"}[self.path]
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"not here")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, chunk: bytes, pause: float) -> None:
        """Until the client hangs up (or the tests' patience runs out, or 4 × the limit is sent): the fetcher
        is what must stop."""
        deadline, sent = time.monotonic() + PATIENCE, 0
        try:
            while time.monotonic() < deadline and sent <= 4 * LIMIT:
                self.wfile.write(chunk)
                self.wfile.flush()
                sent += len(chunk)
                time.sleep(pause)
        except OSError:
            self.hung_up.append(self.path)

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve_origin(host: str) -> tuple[ThreadingHTTPServer, list[tuple[str, str]]]:
    seen: list[tuple[str, str]] = []
    origin = ThreadingHTTPServer((host, 0), type("Handler", (Origin,), {"seen": seen, "hung_up": []}))
    origin.daemon_threads = True
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    return origin, seen


@pytest.fixture(scope="module")
def origin_server() -> Iterator[ThreadingHTTPServer]:
    server, _ = serve_origin(ORIGIN_HOST)
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def origin(origin_server: ThreadingHTTPServer) -> tuple[str, list[tuple[str, str]]]:
    return f"http://{ORIGIN_HOST}:{origin_server.server_address[1]}", origin_server.RequestHandlerClass.seen


@pytest.fixture(scope="module")
def fetching(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Fetching on, allowed to reach 127.0.0.2 only (set through the environment, the rest by flags)."""
    work = tmp_path_factory.mktemp("fetch-server")
    process = ServerProcess("standalone", ["--models-dir", str(models_dir), "--model", "tiny-sd15", "--images-dir",
                                           str(work / "images"), "--fetch-image-urls", "--fetch-timeout", str(TIMEOUT),
                                           "--max-upload-bytes", str(LIMIT)], work,
                            env={"SDSERVE_FETCH_ALLOW_NETWORKS": f"{ORIGIN_HOST}/32"}).start()
    yield process
    process.stop()


def edit(server: ServerProcess, image_url: str, mask_url: str | None = None) -> httpx.Response:
    body = {**FIELDS, "images": [{"image_url": image_url}]}
    if mask_url is not None:
        body["mask"] = {"image_url": mask_url}
    return httpx.post(f"{server.url}/v1/images/edits", json=body, timeout=PATIENCE)


def refused(response: httpx.Response, status: int, param: str, code: str) -> None:
    error = response.json()["error"]
    assert (response.status_code, error["param"], error["code"]) == (status, param, code), response.text


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_off_by_default(server: ServerProcess, origin: tuple[str, list[tuple[str, str]]]) -> None:
    base, seen = origin
    before = len(seen)
    refused(edit(server, f"{base}/in.png"), 400, "images", "image_url_not_allowed")
    assert len(seen) == before  # nothing was fetched


def test_a_fetched_edit_equals_the_data_url_edit(fetching: ServerProcess,
                                                  origin: tuple[str, list[tuple[str, str]]]) -> None:
    base, seen = origin
    fetched = edit(fetching, f"{base}/in.png", f"{base}/redirect-same")  # the mask, by a same-host redirect
    assert fetched.status_code == 200, fetched.text
    inline = edit(fetching, data_url(IMAGE), data_url(MASK))
    assert inline.status_code == 200, inline.text
    assert fetched.json()["data"][0]["b64_json"] == inline.json()["data"][0]["b64_json"]
    netloc = base.removeprefix("http://")
    assert {("/in.png", netloc), ("/redirect-same", netloc), ("/mask.png", netloc)} <= set(seen)


def test_addresses_not_allowed_are_refused_before_connecting(fetching: ServerProcess,
                                                            origin: tuple[str, list[tuple[str, str]]]) -> None:
    port = origin[0].rsplit(":", 1)[1]
    # Nothing listens at these on loopback; elsewhere nothing may be contacted: a fetch failure instead of
    # the refusal would mean a connection was tried.
    for url in (f"http://127.0.0.1:{port}/in.png", f"http://localhost:{port}/in.png", "http://10.0.0.1/a.png",
                "http://192.168.1.1/a.png", "http://169.254.169.254/latest/meta-data", "https://[fe80::1]/a.png",
                "http://[::ffff:10.1.2.3]/a.png", "http://0.0.0.0/a.png", "http://224.0.0.1/a.png",
                "http://240.0.0.1/a.png", "http://[::1]/a.png", "http://100.64.0.1/a.png",
                "http://[fec0::1]/a.png"):
        refused(edit(fetching, url), 400, "images", "image_url_address_not_allowed")
    refused(edit(fetching, "http://127.0.0.1:99999/a.png"), 400, "images", "invalid_images")  # was a 500
    refused(edit(fetching, data_url(IMAGE), "http://10.9.8.7/m.png"), 400, "mask", "image_url_address_not_allowed")


def test_limits_timeouts_and_redirects(fetching: ServerProcess, origin: tuple[str, list[tuple[str, str]]],
                                       origin_server: ThreadingHTTPServer) -> None:
    base, _ = origin
    refused(edit(fetching, f"{base}/big-declared"), 413, "images", "file_too_large")
    refused(edit(fetching, data_url(IMAGE), f"{base}/big-streamed"), 413, "mask", "file_too_large")
    refused(edit(fetching, f"{base}/slow"), 400, "images", "image_url_timeout")
    # The body trickles for 100 s, and the origin goes on for the tests' patience: the fetcher hung up first
    # (the deadline stopped it; an origin that gave up would have cut the body short, a fetch failure).
    until("the fetcher hangs up on the slow body", lambda: "/slow" in origin_server.RequestHandlerClass.hung_up)
    refused(edit(fetching, f"{base}/redirect-other"), 400, "images", "image_url_redirect_not_allowed")
    refused(edit(fetching, f"{base}/redirect-loop"), 400, "images", "image_url_redirect_not_allowed")
    refused(edit(fetching, f"{base}/missing"), 400, "images", "image_url_fetch_failed")
    assert fetching.alive() and httpx.get(f"{fetching.url}/healthz", timeout=5).status_code == 200


def test_a_host_name_is_fetched_from_the_address_it_was_checked_at() -> None:
    """`localhost` resolves here; with loopback allowed the fetch connects to 127.0.0.1 and names the host."""
    origin, seen = serve_origin("127.0.0.1")
    port = origin.server_address[1]
    try:
        settings = Settings(fetch_image_urls=True, fetch_allow_networks=["127.0.0.0/8"], images_dir="/tmp")
        body = anyio.run(fetch.fetch, f"http://LocalHost:{port}/in.png", "images", settings)
        assert body == IMAGE and seen == [("/in.png", f"localhost:{port}")]
        with pytest.raises(ApiError) as refusal:  # the same name, loopback not allowed: no request
            anyio.run(fetch.fetch, f"http://localhost:{port}/in.png", "images", Settings(images_dir="/tmp"))
        assert refusal.value.code == "image_url_address_not_allowed" and len(seen) == 1
    finally:
        origin.shutdown()
