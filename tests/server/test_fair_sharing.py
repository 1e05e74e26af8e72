"""API keys share a server fairly: a model's queue takes turns between keys, a key at its `max_concurrent`
waits while others render, and a key over its `rate` gets 429 `rate_limit_exceeded` with an honest
Retry-After (OpenAI's shape on /v1, FastAPI's on /sdapi). Renders are held inside ONNX Runtime by
tests/faults while the queue fills, and the order they ran in is read from its log of UNet calls (each key
asks for its own size, so a call's latent shape says whose render it was)."""

from __future__ import annotations

import base64
import contextlib
import math
import re
import threading
import time
from collections.abc import Iterator
from itertools import groupby
from pathlib import Path

import httpx

from tests.faults import environment
from tests.patience import PATIENCE, until
from tests.processes import ServerProcess

KEYS = """# tenants
sk-alice
sk-bob
sk-carol   rate=2/m   # two requests a minute
sk-dave    max_concurrent=1
sk-erin
"""
GEN = "/v1/images/generations"
SIZES = {"alice": "64x64", "bob": "64x128", "dave": "64x64", "erin": "64x128"}  # latents 8x8 and 16x8


@contextlib.contextmanager
def serving(tiny_sd15: Path, work: Path, faults: Path, slots: int) -> Iterator[ServerProcess]:
    """A standalone server with the keys above, its ONNX Runtime obeying `faults`."""
    (work / "keys.txt").write_text(KEYS)
    process = ServerProcess("standalone", ["--models-dir", str(tiny_sd15), "--model", "tiny-sd15", "--images-dir",
                                           str(work / "images"), "--api-keys-file", str(work / "keys.txt"),
                                           "--render-slots", str(slots), "--queue-depth", "20", "--threads", "1"],
                            work, env=environment(faults)).start()
    try:
        yield process
    finally:
        (faults / "pause").unlink(missing_ok=True)
        process.stop()


class Requests:
    """Requests sent on threads; each answer kept by name."""

    def __init__(self, url: str) -> None:
        self.url, self.answers, self.threads = url, {}, []

    def send(self, name: str, key: str, path: str = GEN, body: dict | None = None) -> None:
        body = body or {"prompt": name, "size": SIZES[key], "steps": 2, "response_format": "b64_json"}
        def post() -> None:
            self.answers[name] = httpx.post(self.url + path, json=body, timeout=PATIENCE,
                                            headers={"Authorization": f"Bearer sk-{key}"})
        thread = threading.Thread(target=post)
        thread.start()
        self.threads.append(thread)

    def wait(self) -> dict[str, int]:
        for thread in self.threads:
            thread.join(PATIENCE)
        return {name: answer.status_code for name, answer in self.answers.items()}


def gauge(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    found = re.search(rf'^{name}{{model="tiny-sd15"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def unet_calls(faults: Path) -> list[str]:
    log = faults / "unet.log"
    return log.read_text().split() if log.exists() else []


def test_keys_take_turns_in_the_queue(tiny_sd15: Path, tmp_path: Path, faults: Path) -> None:
    with serving(tiny_sd15, tmp_path, faults, slots=1) as server:
        requests = Requests(server.url)
        (faults / "pause").touch()
        requests.send("alice-0", "alice")
        until("alice's first render is held in the UNet", (faults / "paused").exists)
        for i in range(1, 5):
            requests.send(f"alice-{i}", "alice")
            until(f"{i} of alice's requests wait", lambda i=i: gauge(server, "sdserve_queue_depth") == i)
        requests.send("bob", "bob")  # after all of alice's
        until("bob's request waits too", lambda: gauge(server, "sdserve_queue_depth") == 5)
        (faults / "pause").unlink()
        assert set(requests.wait().values()) == {200}
        runs = [shape for shape, _ in groupby(unet_calls(faults))]
        # one slot: renders run one after another. Turns: alice-0 (running), alice-1, bob, alice-2..4;
        # first come first served would have run bob last: ["8x8", "16x8"].
        assert runs == ["8x8", "16x8", "8x8"], unet_calls(faults)
        assert unet_calls(faults).count("16x8") == 2 and len(unet_calls(faults)) == 12  # 2 steps a render


def test_a_key_at_its_cap_waits_while_others_render(tiny_sd15: Path, tmp_path: Path, faults: Path) -> None:
    with serving(tiny_sd15, tmp_path, faults, slots=2) as server:
        requests = Requests(server.url)
        (faults / "pause").touch()
        requests.send("dave-0", "dave")
        until("dave's first render is held", lambda: unet_calls(faults) == ["8x8"])
        requests.send("dave-1", "dave")  # a slot is free, but dave is at max_concurrent=1
        until("dave's second request waits", lambda: gauge(server, "sdserve_queue_depth") == 1)
        requests.send("erin", "erin")  # erin takes the free slot, ahead of dave's second
        until("erin's render is held beside dave's", lambda: "16x8" in unet_calls(faults))
        assert unet_calls(faults) == ["8x8", "16x8"] and gauge(server, "sdserve_queue_depth") == 1
        (faults / "pause").unlink()
        assert requests.wait() == {"dave-0": 200, "dave-1": 200, "erin": 200}


def test_a_key_over_its_rate_gets_429_with_an_honest_retry_after(tiny_sd15: Path, tmp_path: Path,
                                                                 faults: Path) -> None:
    with serving(tiny_sd15, tmp_path, faults, slots=1) as server:
        carol = {"Authorization": "Bearer sk-carol"}
        body = {"prompt": "rated", "size": "64x64", "steps": 1, "response_format": "b64_json"}
        sent = time.monotonic()
        first = httpx.post(server.url + GEN, json=body, headers=carol, timeout=PATIENCE)
        answered = time.monotonic()  # the server took the first token between `sent` and now
        assert [first.status_code, httpx.post(server.url + GEN, json=body, headers=carol,
                                              timeout=PATIENCE).status_code] == [200, 200]
        time.sleep(max(0.0, answered + 2 - time.monotonic()))  # a while since the first token: Retry-After < 30
        asked = time.monotonic()
        refused = httpx.post(server.url + GEN, json=body, headers=carol, timeout=PATIENCE)
        refused_at = time.monotonic()
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "2 requests per minute" in error["message"]
        # a token every 30 s: the next one comes 30 s after the first request, less what passed between the
        # first token and the refusal (at least `asked - answered`, at most `refused_at - sent`), however slow
        assert max(1, math.ceil(30 - (refused_at - sent))) <= int(refused.headers["retry-after"]) \
            <= max(1, math.ceil(30 - (asked - answered)))
        basic = {"Authorization": "Basic " + base64.b64encode(b"carol:sk-carol").decode()}
        a1111 = httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "rated", "steps": 1, "width": 64,
                                                                   "height": 64}, headers=basic, timeout=60)
        assert a1111.status_code == 429 and "rate limit" in a1111.json()["detail"], a1111.text
        assert "retry-after" in a1111.headers
        # other keys are not held to carol's rate; reading the models is not a render
        bob = {"Authorization": "Bearer sk-bob"}
        assert httpx.post(server.url + GEN, json=body, headers=bob, timeout=60).status_code == 200
        assert httpx.get(server.url + "/v1/models", headers=carol, timeout=10).status_code == 200
