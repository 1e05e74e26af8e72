"""sd-webui-controlnet through the real `webuiapi` package, on a standalone server and on a router whose node
hosts the ControlNet: its routes (the model list with `[hash]` names, the modules, and `detect` checked against
OpenCV's Canny on the same pixels), and its units on txt2img and img2img (`alwayson_scripts.controlnet.args`),
which render what the OpenAI route's `controlnet` field renders; bad units are 422s naming their field."""

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
    fleet.wait_nodes({"node-a"})
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


# -- units on txt2img and img2img (alwayson_scripts.controlnet.args) ------------------------------------

RENDER = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4, "cfg_scale": 5.0, "seed": 5,
          "sampler_name": "Euler"}


def _rendered(result: webuiapi.WebUIApiResult) -> np.ndarray:
    return np.asarray(result.image.convert("RGB"))


def _openai(server: ServerProcess, **fields: object) -> np.ndarray:
    body = {"model": MODEL, "prompt": RENDER["prompt"], "size": "64x64", "steps": 4, "guidance_scale": 5.0,
            "seed": 5, "sampler": "euler", "response_format": "b64_json", **fields}
    answer = httpx.post(server.url + "/v1/images/generations", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    picture = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
    return np.asarray(picture.convert("RGB"))


@pytest.mark.parametrize("front", ["standalone", "router"])
def test_txt2img_canny_unit_renders_what_the_openai_route_renders(request: pytest.FixtureRequest, model_dir: Path,
                                                                  front: str) -> None:
    """webuiapi's ControlNetUnit, named `name [hash]`, with an 80x96 picture cropped to 64x64 ("Crop and
    Resize"), is the OpenAI `controlnet` unit with the same image, scale, window and thresholds (on a router:
    sent to the node that has the ControlNet)."""
    standalone = request.getfixturevalue(front)
    picture = Image.fromarray(_picture(4))
    unit = webuiapi.ControlNetUnit(image=picture, module="canny", model=_title(model_dir), weight=1.4,
                                   guidance_start=0.1, guidance_end=0.8, threshold_a=40, threshold_b=160,
                                   resize_mode="Crop and Resize", processor_res=80)
    guided = _rendered(_api(standalone).txt2img(**RENDER, controlnet_units=[unit], alwayson_scripts={}))
    openai = _openai(standalone, controlnet=[{
        "model": NET, "image": base64.b64encode(_png(picture)).decode(), "scale": 1.4, "start": 0.1, "end": 0.8,
        "preprocess": "canny", "low": 40, "high": 160}])
    assert np.array_equal(guided, openai)
    plain = _rendered(_api(standalone).txt2img(**RENDER, alwayson_scripts={}))
    assert not np.array_equal(guided, plain)  # the unit changed the render: the comparison is not of two plain ones


def test_resize_and_fill_fits_the_image_inside_on_its_border_colour(standalone: ServerProcess) -> None:
    """webuiapi's default resize_mode, "Resize and Fill": a 32x16 picture is scaled to 64x32 and centred on the
    median colour of its border, as sd-webui-controlnet fills; the OpenAI route gets that image made here."""
    picture = np.random.default_rng(8).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    border = np.concatenate([picture[0], picture[-1], picture[:, 0], picture[:, -1]])
    filled = Image.new("RGB", (64, 64), tuple(int(v) for v in np.median(border, axis=0)))
    filled.paste(Image.fromarray(picture).resize((64, 32), Image.Resampling.LANCZOS), (0, 16))
    unit = webuiapi.ControlNetUnit(image=Image.fromarray(picture), module="none", model=NET, weight=1.5)
    guided = _rendered(_api(standalone).txt2img(**RENDER, controlnet_units=[unit], alwayson_scripts={}))
    openai = _openai(standalone, controlnet=[{"model": NET, "image": base64.b64encode(_png(filled)).decode(),
                                              "scale": 1.5}])
    assert np.array_equal(guided, openai)


def test_img2img_unit_without_an_image_uses_the_init_image(standalone: ServerProcess) -> None:
    """As sd-webui-controlnet does; the model named without its hash, the module as `None`."""
    init = Image.fromarray(np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    api = _api(standalone)

    def img2img(*units: webuiapi.ControlNetUnit) -> np.ndarray:
        return _rendered(api.img2img(images=[init], denoising_strength=0.7, **RENDER, controlnet_units=list(units),
                                     alwayson_scripts={}))

    without_image = img2img(webuiapi.ControlNetUnit(module="None", model=NET, weight=1.5))
    with_init = img2img(webuiapi.ControlNetUnit(image=init, module="none", model=NET, weight=1.5))
    assert np.array_equal(without_image, with_init)
    assert not np.array_equal(without_image, img2img())


def _unit(**fields: object) -> dict:
    image = base64.b64encode(_png(Image.fromarray(_picture(5)))).decode()
    return {"image": image, "module": "canny", "model": NET, "weight": 1.0, "enabled": True} | fields


@pytest.mark.parametrize(("units", "loc", "named"), [
    ([_unit(module="depth_midas")], [0, "module"], "depth_midas"),
    ([_unit(model="nope [12345678]")], [0, "model"], "nope"),
    ([_unit(enabled=False, module="x"), _unit(weight=3)], [1, "weight"], "args[1].weight"),
    ([_unit(guidance_start=0.9, guidance_end=0.2)], [0, "guidance_start"], "below"),
    ([_unit(threshold_a="low")], [0, "threshold_a"], "float"),
    ([_unit(control_mode="My prompt is more important")], [0, "control_mode"], "Balanced"),
    ([_unit(image="")], [0, "image"], "txt2img"),
    ([_unit(image="bm90IGFuIGltYWdl")], [0, "image"], "image"),
    ([_unit()] * 5, [], "at most 4"),
])
def test_bad_units_are_422_naming_the_field_and_nothing_renders(standalone: ServerProcess, units: list,
                                                                loc: list, named: str) -> None:
    before = _renders(standalone)
    answer = httpx.post(standalone.url + "/sdapi/v1/txt2img", timeout=60, json={
        **RENDER, "alwayson_scripts": {"ControlNet": {"args": units}}})
    assert answer.status_code == 422, answer.text
    problem = answer.json()["detail"][0]
    assert problem["loc"] == ["body", "alwayson_scripts", "ControlNet", "args", *loc] and named in problem["msg"]
    assert _renders(standalone) == before


def _renders(server: ServerProcess) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sdserve_render_seconds_count"))
