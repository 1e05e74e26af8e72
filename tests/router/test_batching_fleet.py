"""A batching node behind a router: the node reports the requests it takes at once (render slots × the renders
a slot interleaves, plus queue depth), so the router sends it enough concurrent requests to share UNet calls."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.router.fleet import Fleet, generate_many, statuses


@pytest.fixture(scope="module")
def fleet(tiny_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One node, no queue: without batching it takes one request at a time; batching with calls of 8 rows, as
    many of its default requests (one guided image: 2 rows) as one call steps: four."""
    work = tmp_path_factory.mktemp("batching-fleet")
    (work / "models").mkdir()
    (work / "models" / "tiny-sd15").symlink_to(tiny_model("tiny-sd15"))
    fleet = Fleet(work / "models", work)
    fleet.add_node("batcher", "tiny-sd15", extra=["--queue-depth", "0", "--batch-window", "2000", "--max-batch", "8"])
    try:
        yield fleet.start()
    finally:
        fleet.stop()


def test_the_router_fills_a_batching_node(fleet: Fleet) -> None:
    assert fleet.views()["batcher"]["load"]["tiny-sd15"]["capacity"] == 4
    body = {"model": "tiny-sd15", "prompt": "a lighthouse", "size": "64x64", "steps": 3, "guidance_scale": 5.0,
            "response_format": "b64_json"}
    responses = asyncio.run(generate_many(fleet.router.url, 4, body))
    assert statuses(responses) == [200] * 4
    metrics = httpx.get(fleet.nodes["batcher"].url + "/metrics", timeout=10).text
    full = re.search(r'^sdserve_unet_batch_rows_bucket\{le="8.0",model="tiny-sd15"\} (\S+)$', metrics, re.M)
    small = re.search(r'^sdserve_unet_batch_rows_bucket\{le="6.0",model="tiny-sd15"\} (\S+)$', metrics, re.M)
    assert full and small and float(full.group(1)) > float(small.group(1))  # the four shared a call of 8 rows
