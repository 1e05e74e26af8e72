"""sd-webui-controlnet's routes (/controlnet) through the real `webuiapi` package, on a standalone server and
on a router whose node hosts the ControlNet: the model list with `[hash]` names, the modules, and `detect`
checked against OpenCV's Canny on the same pixels."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from tests.processes import ServerProcess
from tests.router.fleet import Fleet

MODEL = "tiny-sd15"
NET = "tiny-controlnet-sd15"
LOADING = 300  # seconds a server may take to load the model on a machine busy with other work


@pytest.fixture(scope="module")
def model_dir(controlnet_model: Callable[[str], Path]) -> Path:
    return controlnet_model(MODEL)


@pytest.fixture(scope="module")
def standalone(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("sdapi-controlnet")
    process = ServerProcess("standalone", ["--models-dir", str(model_dir.parent), "--model", MODEL,
                                           "--images-dir", str(work / "images")], work).start(timeout=LOADING)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def router(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    fleet = Fleet(model_dir.parent, tmp_path_factory.mktemp("sdapi-controlnet-fleet"), ["--default-model", MODEL])
    node = fleet.add_node("node-a", MODEL)
    fleet.router.start(ready=False, timeout=LOADING)
    node.start(ready=False, timeout=LOADING)
    fleet.wait_nodes({"node-a"}, timeout=LOADING)
    yield fleet.router
    fleet.stop()


def _api(server: ServerProcess) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


def _title(model_dir: Path) -> str:
    """sd-webui-controlnet's `name [hash]`: the hash from the graph file's bytes, hashed here."""
    graph = json.loads((model_dir / "model.json").read_text())["controlnets"][NET]["component"]["graph"]["path"]
    return f"{NET} [{hashlib.sha256((model_dir / graph).read_bytes()).hexdigest()[:8]}]"


@pytest.mark.parametrize("front", ["standalone", "router"])
def test_model_list_names_the_controlnets_with_their_hash(request: pytest.FixtureRequest, model_dir: Path,
                                                          front: str) -> None:
    """On a router the names come from its node's card, as LoRA adapters' do."""
    api = _api(request.getfixturevalue(front))
    assert api.controlnet_model_list() == [_title(model_dir)]
    assert webuiapi.ControlNetInterface(api, show_deprecation_warning=False).model_list() == [_title(model_dir)]


def test_version_and_modules(standalone: ServerProcess) -> None:
    api = _api(standalone)
    assert api.controlnet_version() == 3
    assert api.controlnet_module_list() == ["none", "canny"]
    detail = httpx.get(standalone.url + "/controlnet/module_list", timeout=10).json()["module_detail"]
    assert [(s["name"], s["value"]) for s in detail["canny"]["sliders"]] == [
        ("Resolution", 512), ("Low Threshold", 100), ("High Threshold", 200)]


def _edges(pixels: np.ndarray, low: int, high: int) -> np.ndarray:
    """sd-webui-controlnet's canny at a resolution equal to the image's short side (no resize): pad to
    multiples of 64 with the edge pixels, cv2.Canny, crop, three channels."""
    height, width = pixels.shape[:2]
    padded = np.pad(pixels, ((0, -height % 64), (0, -width % 64), (0, 0)), mode="edge")
    edges = cv2.Canny(padded, low, high)[:height, :width]
    return np.repeat(edges[:, :, None], 3, axis=2)


def _picture(seed: int) -> np.ndarray:
    """A faint noise under a rectangle whose left half stands out strongly (Sobel L1 about 240) and its right
    half weakly (about 60): which edges show depends on both thresholds."""
    pixels = np.random.default_rng(seed).integers(100, 104, (80, 96, 3), dtype=np.uint8)
    pixels[20:60, 16:48] += 60
    pixels[20:60, 48:80] += 15
    return pixels


def test_detect_canny_is_opencvs(standalone: ServerProcess) -> None:
    pictures = [_picture(1), _picture(2)]
    result = _api(standalone).controlnet_detect([Image.fromarray(p) for p in pictures], module="canny",
                                                processor_res=80, threshold_a=40, threshold_b=160)
    maps = [np.asarray(image.convert("RGB")) for image in result.images]
    assert result.info == "Success" and len(maps) == 2
    for found, picture in zip(maps, pictures, strict=True):
        assert np.array_equal(found, _edges(picture, 40, 160))
    assert _edges(pictures[0], 40, 160).any()  # the comparison is not of two blank maps
    assert not np.array_equal(_edges(pictures[0], 40, 160), _edges(pictures[0], 100, 160))  # thresholds tell


def test_detect_defaults_resolution_and_none(standalone: ServerProcess) -> None:
    """-1 or a value off the slider takes its default (512, 100, 200); `none` gives the image back."""
    picture = Image.fromarray(_picture(3))
    answer = httpx.post(standalone.url + "/controlnet/detect", timeout=60, json={
        "controlnet_module": "canny", "controlnet_input_images": [base64.b64encode(_png(picture)).decode()],
        "controlnet_threshold_a": -1, "controlnet_threshold_b": 999})
    assert answer.status_code == 200, answer.text
    found = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    assert found.size == (round(96 * 512 / 80), 512)  # the short side at the default resolution
    small = _api(standalone).controlnet_detect([picture], module="canny", processor_res=80, threshold_a=-1)
    assert np.array_equal(np.asarray(small.images[0].convert("RGB")), _edges(_picture(3), 100, 64))
    same = _api(standalone).controlnet_detect([picture], module="none")
    assert np.array_equal(np.asarray(same.images[0].convert("RGB")), _picture(3))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(("body", "loc", "named"), [
    ({"controlnet_module": "depth_midas", "controlnet_input_images": ["x"]}, "controlnet_module", "depth_midas"),
    ({"controlnet_module": "canny"}, "controlnet_input_images", "No image"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["bm90IGFuIGltYWdl"]}, "controlnet_input_images",
     "controlnet_input_images"),
    ({"controlnet_module": "canny", "controlnet_input_images": [], "controlnet_processor_res": "high"},
     "controlnet_processor_res", "int"),
])
def test_detect_refusals_are_422_naming_the_field(standalone: ServerProcess, body: dict, loc: str,
                                                  named: str) -> None:
    answer = httpx.post(standalone.url + "/controlnet/detect", json=body, timeout=30)
    assert answer.status_code == 422, answer.text
    problem = answer.json()["detail"][0]
    assert problem["loc"] == ["body", loc] and named in problem["msg"]
