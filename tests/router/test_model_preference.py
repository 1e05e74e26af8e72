"""Behind a router, nodes that load models on demand: the router sends each request to a node that has its
model loaded (from the loaded models in the nodes' reports), so that no node unloads a model for nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.patience import until
from tests.router.fleet import ADMIN_HEADERS, GEN, Fleet


@pytest.fixture
def fleet(tiny_model: Callable[[str], Path], tmp_path: Path) -> Iterator[Fleet]:
    models = tmp_path / "models"
    models.mkdir()
    for name in ("tiny-sd15", "tiny-sd21"):
        (models / name).symlink_to(tiny_model(name))
    fleet = Fleet(models, tmp_path, node_args=["--heartbeat-interval", "1", "--max-loaded-models", "1"])
    fleet.add_node("node-a")
    fleet.add_node("node-b")
    yield fleet.start()
    fleet.stop()


def test_the_router_prefers_the_node_that_has_the_model_loaded(fleet: Fleet) -> None:
    for node, model in (("node-a", "tiny-sd15"), ("node-b", "tiny-sd21")):
        loaded = httpx.post(f"{fleet.nodes[node].url}/v0/models/{model}/load", headers=ADMIN_HEADERS, timeout=120)
        assert loaded.status_code == 200 and loaded.json()["state"] == "loaded", loaded.text
    until("the router sees what each node has loaded",
          lambda: {name: view["loaded"] for name, view in fleet.views().items()}
          == {"node-a": ["tiny-sd15"], "node-b": ["tiny-sd21"]}, deadline=30)
    for model, node in (("tiny-sd15", "node-a"), ("tiny-sd21", "node-b"), ("tiny-sd15", "node-a")):
        before = fleet.views()
        for _ in range(5):  # one after the other: every node is idle, so only what is loaded tells them apart
            answer = httpx.post(fleet.router.url + GEN, json={"model": model, "prompt": "p", "size": "64x64",
                                                              "steps": 1}, timeout=120)
            assert answer.status_code == 200, answer.text
        assert fleet.served(before) == {"node-a": 5 if node == "node-a" else 0,
                                        "node-b": 5 if node == "node-b" else 0}
    for process in fleet.nodes.values():
        assert not process.log_lines("unloaded", timeout=0), process.log()
