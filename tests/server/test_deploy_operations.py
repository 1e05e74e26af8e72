"""What deployments lean on: a server over an optimum-layout ONNX folder as it is, JSON logs, CORS, and
routers sharing one images directory (several replicas behind one Service serve each other's URLs)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.openai.store import ImageStore
from tests.processes import ROOT, ServerProcess

FIXTURES = ROOT / "tests" / "fixtures" / "optimum"
ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """A standalone server (JSON logs, CORS for ORIGIN) over the optimum folders, and a router with no
    nodes that shares its images directory."""
    work = tmp_path_factory.mktemp("deploy")
    images = work / "shared-images"
    (images / "lost+found").mkdir(parents=True)  # as on a freshly formatted volume
    first = ServerProcess("standalone", ["--models-dir", str(FIXTURES), "--model", "sd15", "--images-dir",
                                         str(images), "--log-format", "json"], work,
                          env={"SDSERVE_CORS_ORIGINS": ORIGIN}, name="first")
    second = ServerProcess("router", ["--images-dir", str(images), "--node-token", "t"], work, name="second")
    first.start()
    second.start(ready=False)
    yield first, second
    first.stop()
    second.stop()


def test_optimum_folder_served_and_url_shared(shared: tuple[ServerProcess, ServerProcess]) -> None:
    first, second = shared
    models = httpx.get(first.url + "/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["sd15"]
    reply = httpx.post(first.url + "/v1/images/generations", timeout=120, headers={"x-request-id": "deploy-1"},
                       json={"prompt": "a lighthouse", "size": "64x64", "steps": 2, "response_format": "url"})
    assert reply.status_code == 200, reply.text
    url = reply.json()["data"][0]["url"]
    assert url.startswith(first.url)
    image = httpx.get(url.replace(first.url, second.url), timeout=10)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert image.content == httpx.get(url, timeout=10).content
    # the access log, in JSON, with the request id the client gave
    lines = first.log_lines('"deploy-1"')
    entries = [json.loads(line) for line in lines]
    assert any(e["logger"] == "sdserve.access" and e["status"] == 200 and e["path"] == "/v1/images/generations"
               for e in entries), lines


def test_json_log_is_one_object_per_line(shared: tuple[ServerProcess, ServerProcess]) -> None:
    first, _ = shared
    httpx.get(first.url + "/healthz", headers={"x-request-id": "deploy-2"}, timeout=10)
    first.log_lines('"deploy-2"')
    lines = [line for line in first.log().splitlines() if line.strip()]
    assert len(lines) >= 5
    for line in lines:
        entry = json.loads(line)  # every line, start-up and model loading included
        assert {"time", "level", "logger", "message"} <= set(entry)
    assert any("inferred from its optimum layout" in json.loads(line)["message"] for line in lines)


def test_cors(shared: tuple[ServerProcess, ServerProcess]) -> None:
    first, second = shared
    preflight = httpx.options(first.url + "/v1/images/generations", timeout=10, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os"})
    assert preflight.status_code in (200, 204)
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "x-stainless-os" in preflight.headers["access-control-allow-headers"].lower()
    listed = httpx.get(first.url + "/v1/models", headers={"Origin": ORIGIN}, timeout=10)
    assert listed.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in listed.headers["access-control-expose-headers"].lower()
    other = httpx.get(first.url + "/v1/models", headers={"Origin": "https://evil.example"}, timeout=10)
    assert "access-control-allow-origin" not in other.headers
    # off unless configured
    assert "access-control-allow-origin" not in httpx.get(second.url + "/healthz", headers={"Origin": ORIGIN},
                                                          timeout=10).headers


def test_sweep_on_a_shared_volume(tmp_path: Path) -> None:
    """Two stores on one directory: either may sweep; what is not an image is left alone."""
    one, two = ImageStore(tmp_path, ttl=60), ImageStore(tmp_path, ttl=60)
    (tmp_path / "lost+found").mkdir()
    (tmp_path / "README").write_text("not ours")
    fresh, old = one.put(b"fresh", "png"), two.put(b"old", "png")
    hour_ago = time.time() - 3600
    for name in (old, "lost+found", "README"):
        os.utime(tmp_path / name, (hour_ago, hour_ago))
    assert one.sweep() == 1
    assert two.get(fresh) is not None and one.get(old) is None
    assert (tmp_path / "lost+found").is_dir() and (tmp_path / "README").is_file()
