"""LoRA over HTTP through a real router and two nodes: the `lora` field and prompt tags on every route,
adapters listed in /v1/models, refusals as 400s naming `lora`, a reload without restart, and dispatch
only to the nodes that offer a request's adapters."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests import adapters
from tests.patience import until
from tests.router.fleet import ADMIN_HEADERS, GEN, Fleet
from tests.server.conftest import wait_for_models

BODY = {"model": "lora-sd15", "prompt": "a red cat", "size": "64x64", "steps": 2, "response_format": "b64_json",
        "seed": 5}


@pytest.fixture(scope="module")
def lora_fleet(lora_model: Callable[[str], Path], tiny_model: Callable[[str], Path],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """node-a offers `full` and `unetk` (and a LoCon and an SDXL file it refuses); node-b only `unetk`.
    Both serve `lora-sd15` (exported with LoRA support); node-a also `plain-sd15` (without)."""
    work = tmp_path_factory.mktemp("lora-fleet")
    models = work / "models"
    models.mkdir()
    (models / "lora-sd15").symlink_to(lora_model("tiny-sd15"))
    (models / "plain-sd15").symlink_to(tiny_model("tiny-sd15"))
    dirs = {name: work / f"lora-{name}" for name in ("a", "b")}
    for folder in dirs.values():
        folder.mkdir()
    adapters.make(dirs["a"], "full", "tiny-sd15", ("unet", "text_encoder"), rank=4, alpha=4, seed=1)
    adapters.make(dirs["a"], "unetk", "tiny-sd15", ("unet",), rank=2, alpha=3, seed=2, kohya=True)
    adapters.make(dirs["a"], "xl", "tiny-sdxl", ("unet",), rank=2, alpha=2, seed=3)
    adapters.locon(dirs["a"])
    shutil.copy(dirs["a"] / "unetk.safetensors", dirs["b"])
    fleet = Fleet(models, work)
    fleet.add_node("node-a", "lora-sd15", "plain-sd15", extra=["--lora-dir", str(dirs["a"])])
    fleet.add_node("node-b", "lora-sd15", extra=["--lora-dir", str(dirs["b"])])
    fleet.dirs = dirs
    try:
        fleet.start()
        wait_for_models(fleet.router, {"lora-sd15", "plain-sd15"})  # a node registers with its first model
        yield fleet
    finally:
        fleet.stop()


def _post(fleet: Fleet, body: dict, path: str = GEN) -> httpx.Response:
    return httpx.post(fleet.router.url + path, json=body, timeout=60)


def _image(response: httpx.Response, index: int = 0) -> bytes:
    assert response.status_code == 200, response.text
    return base64.b64decode(response.json()["data"][index]["b64_json"])


def _requests(fleet: Fleet) -> dict[str, int]:
    return {name: view["requests"] for name, view in fleet.views().items()}


def test_models_list_adapters(lora_fleet: Fleet) -> None:
    cards = {m["id"]: m for m in httpx.get(lora_fleet.router.url + "/v1/models", timeout=10).json()["data"]}
    listed = {a["name"]: a for a in cards["lora-sd15"]["adapters"]}
    assert set(listed) == {"full", "unetk"}
    assert listed["full"] == {"name": "full", "rank": 4, "parts": ["unet", "text_encoder"]}
    assert cards["lora-sd15"]["lora_rank"] == 8
    assert cards["plain-sd15"]["adapters"] == [] and cards["plain-sd15"]["lora_rank"] == 0


def test_only_nodes_with_the_adapter_render_it(lora_fleet: Fleet) -> None:
    before = _requests(lora_fleet)
    for _ in range(4):
        _image(_post(lora_fleet, BODY | {"lora": [{"name": "full", "scale": 0.8}]}))
    after = _requests(lora_fleet)
    assert after["node-a"] - before["node-a"] == 4 and after["node-b"] == before["node-b"]
    for _ in range(4):  # both nodes offer unetk: the router may use either
        _image(_post(lora_fleet, BODY | {"lora": [{"name": "unetk", "scale": 1.0}]}))


def test_tags_field_and_seeds(lora_fleet: Fleet) -> None:
    plain = _image(_post(lora_fleet, BODY))
    field = _post(lora_fleet, BODY | {"n": 2, "lora": [{"name": "full", "scale": 0.5}, {"name": "unetk", "scale": 1}]})
    assert _image(field) != plain
    # the tags are stripped from the text, and add to the field in order: the same render
    tagged = _post(lora_fleet, BODY | {"prompt": "a <lora:full:0.5> red cat <lora:unetk>", "seed": 6,
                                       "lora": None})
    assert _image(tagged) == _image(field, 1)  # image 1 of seed 5 is image 0 of seed 6
    both = _post(lora_fleet, BODY | {"prompt": "a red cat <lora:unetk:1>", "lora": [{"name": "full", "scale": 0.5}]})
    assert _image(both) == _image(field)
    summed = _post(lora_fleet, BODY | {"prompt": "a red cat <lora:full:0.2>",
                                       "lora": [{"name": "full", "scale": 0.3}, {"name": "unetk", "scale": 1}]})
    assert _image(summed) != plain


def test_edits_and_variations_take_lora(lora_fleet: Fleet) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 200)).save(buffer, format="PNG")
    form = {"model": "lora-sd15", "size": "64x64", "steps": "2", "seed": "3", "response_format": "b64_json"}
    files = {"image": ("in.png", buffer.getvalue(), "image/png")}
    url = lora_fleet.router.url
    for path, extra in (("/v1/images/edits", {"prompt": "a cat <lora:unetk:2>"}), ("/v1/images/variations", {})):
        plain = httpx.post(url + path, data=form | extra, files=files, timeout=60)
        adapted = httpx.post(url + path, data=form | extra | {"lora": json.dumps([{"name": "full", "scale": 1.5}])},
                             files=files, timeout=60)
        assert _image(adapted) != _image(plain)
        unknown = httpx.post(url + path, data=form | extra | {"lora": '[{"name": "nope"}]'}, files=files, timeout=60)
        assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "lora_not_found"


@pytest.mark.parametrize(("lora", "prompt", "code", "words"), [
    ([{"name": "nope"}], "a cat", "lora_not_found", "nope"),
    (None, "a cat <lora:nope:1>", "lora_not_found", "nope"),
    ([{"name": "locon"}], "a cat", "lora_incompatible", "LoCon"),
    ([{"name": "xl"}], "a cat", "lora_incompatible", "another family"),
    ([{"name": "full", "scale": 4.5}], "a cat", None, "lora"),
    (None, "a cat <lora:full:9>", "invalid_lora", "[-4, 4]"),
    (None, "a cat <lora:full:much>", "invalid_lora", "number"),
    ([{"name": "full"}] * 9, "a cat", "invalid_lora", "at most 8"),
])
def test_refusals(lora_fleet: Fleet, lora: list | None, prompt: str, code: str | None, words: str) -> None:
    answer = _post(lora_fleet, BODY | {"prompt": prompt, "lora": lora})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"].startswith("lora") and words in error["message"]  # lora, or lora[0].scale
    if code:
        assert error["code"] == code


def test_model_without_lora_support(lora_fleet: Fleet) -> None:
    answer = _post(lora_fleet, BODY | {"model": "plain-sd15", "lora": [{"name": "full"}]})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "lora"
    assert "--lora-rank" in answer.json()["error"]["message"]
    _image(_post(lora_fleet, BODY | {"model": "plain-sd15"}))


def test_reload_without_restart(lora_fleet: Fleet) -> None:
    body = BODY | {"lora": [{"name": "fresh"}]}
    assert _post(lora_fleet, body).json()["error"]["code"] == "lora_not_found"
    adapters.make(lora_fleet.dirs["b"], "fresh", "tiny-sd15", ("text_encoder",), rank=2, alpha=2, seed=9)
    node_b = lora_fleet.nodes["node-b"]
    listing = httpx.post(node_b.url + "/v0/adapters/reload", headers=ADMIN_HEADERS, timeout=30)
    assert listing.status_code == 200 and "fresh" in [a["name"] for a in listing.json()["lora-sd15"]]
    answers = []  # the router learns of it with node-b's next heartbeat
    until("the router offers the new adapter", lambda: answers.append(_post(lora_fleet, body)) or
          answers[-1].status_code == 200)
    _image(answers[-1])
