"""Step-level batching on a real server (`--batch-window`): concurrent requests share UNet calls and get the
images an unbatched server gives them; a bad request in a batch fails alone; streamed partials are unchanged."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.processes import ServerProcess

MODEL = "tiny-sd15"
ROWS = 8  # --max-batch: four guided requests of one image fill a call


@pytest.fixture(scope="module")
def batch_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """An idle slot waits up to 2 s for requests to fill its call: four sent at once all join the first call."""
    work = tmp_path_factory.mktemp("batch-server")
    process = ServerProcess("standalone", ["--models-dir", str(models_dir), "--model", MODEL, "--images-dir",
                                           str(work / "images"), "--batch-window", "2000", "--max-batch", str(ROWS)],
                            work).start()
    yield process
    process.stop()


def body(seed: int, **extra: object) -> dict:
    return {"model": MODEL, "prompt": f"a lighthouse, take {seed}", "size": "64x64", "seed": seed,
            "guidance_scale": 6.0, "response_format": "b64_json"} | extra


BODIES = [body(1, steps=3), body(2, steps=7, sampler="euler_a"), body(3, steps=5, sampler="dpmpp_2m", n=2),
          body(4, steps=4, sampler="ddim", guidance_scale=1.0)]  # rows 2 + 2 + 4 + 1: over one call's 8


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: httpx.post(f"{url}/v1/images/generations", json=b, timeout=120), bodies))


def rows_histogram(url: str, small: str = "6.0") -> tuple[float, float, float]:
    """(steps of at most `small` rows, all steps, requests that had their first step) of the batcher so far."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    waits = re.search(rf'^sdserve_batch_wait_seconds_count{{model="{MODEL}"}} (\S+)$', text, re.M)
    return _bucket(text, small), _bucket(text, "+Inf"), float(waits.group(1)) if waits else 0.0


def shared_steps(url: str, before: tuple[float, float, float]) -> float:
    """Steps of more than one request's rows (2 rows each) since `before` (a `rows_histogram(url, "2.0")`)."""
    small, steps, _ = rows_histogram(url, "2.0")
    return (steps - before[1]) - (small - before[0])


def _bucket(text: str, le: str) -> float:
    match = re.search(rf'^sdserve_unet_batch_rows_bucket{{le="{re.escape(le)}",model="{MODEL}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_concurrent_requests_share_calls_and_match_an_unbatched_server(batch_server: ServerProcess,
                                                                      server: ServerProcess) -> None:
    small_before, calls_before, started_before = rows_histogram(batch_server.url)
    batched = post_all(batch_server.url, BODIES)
    small_after, calls_after, started_after = rows_histogram(batch_server.url)
    assert [r.status_code for r in batched] == [200] * len(BODIES), [r.text for r in batched]
    assert calls_after - calls_before > small_after - small_before  # some call took more than 6 rows
    assert started_after - started_before == len(BODIES)  # each one's wait for its first step, observed
    for request, response in zip(BODIES, batched, strict=True):
        alone = httpx.post(f"{server.url}/v1/images/generations", json=request, timeout=120)
        assert alone.status_code == 200
        for mine, theirs in zip(response.json()["data"], alone.json()["data"], strict=True):
            assert np.abs(pixels(mine["b64_json"]) - pixels(theirs["b64_json"])).max() <= 1  # 8-bit rounding


def test_a_bad_request_in_a_batch_fails_alone(batch_server: ServerProcess) -> None:
    """LCM refuses more steps than its original schedule: found when the render begins, inside the batcher."""
    bad = body(9, steps=80, sampler="lcm", guidance_scale=1.0)
    before = rows_histogram(batch_server.url, "2.0")
    responses = post_all(batch_server.url, [BODIES[0], bad, BODIES[1]])
    assert [r.status_code for r in responses] == [200, 400, 200]
    assert shared_steps(batch_server.url, before) > 0  # the good two shared calls
    error = responses[1].json()["error"]
    assert error["param"] == "steps" and error["type"] == "invalid_request_error"
    assert batch_server.process.poll() is None


def test_streamed_partials_in_a_batch_match_an_unbatched_server(batch_server: ServerProcess,
                                                                 server: ServerProcess) -> None:
    streamed = {k: v for k, v in body(21, steps=6).items() if k != "response_format"} | {"stream": True,
                                                                                          "partial_images": 2}

    def events(url: str) -> list[dict]:
        with httpx.stream("POST", f"{url}/v1/images/generations", json=streamed, timeout=120) as response:
            assert response.status_code == 200
            lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        return [json.loads(line) for line in lines if line.strip() != "[DONE]"]

    before = rows_histogram(batch_server.url, "2.0")
    with ThreadPoolExecutor(3) as pool:  # two others fill the call the stream joins
        others = [pool.submit(httpx.post, f"{batch_server.url}/v1/images/generations", json=b, timeout=120)
                  for b in (body(22, steps=9), body(23, steps=3))]
        batched = events(batch_server.url)
        assert all(o.result().status_code == 200 for o in others)
    assert shared_steps(batch_server.url, before) > 0
    alone = events(server.url)
    assert [e["type"] for e in batched] == [e["type"] for e in alone]
    assert [e["type"] for e in alone].count("image_generation.partial_image") == 2
    for mine, theirs in zip(batched, alone, strict=True):
        assert np.abs(pixels(mine["b64_json"]) - pixels(theirs["b64_json"])).max() <= 1


def test_batching_off_runs_no_batcher(server: ServerProcess) -> None:
    """The shared server runs without --batch-window: each render alone, as before batching existed."""
    assert httpx.post(f"{server.url}/v1/images/generations", json=body(5, steps=2), timeout=120).status_code == 200
    assert _bucket(httpx.get(f"{server.url}/metrics", timeout=10).text, "+Inf") == 0
