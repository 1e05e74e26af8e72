"""ControlNet through the OpenAI routes (extension `controlnet`, sent with the `openai` SDK's extra_body):
generations, edits and variations (multipart: the list as JSON text) render what the engines render for the
same units; the model cards list their ControlNets; bad units are 400s naming `controlnet`."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image

import engines
from tests.processes import ServerProcess
from tests.server.conftest import wait_for_models

MODEL, CONTROLNET = "tiny-sd15", "tiny-controlnet-sd15"
SIZE = 64
COMMON = {"seed": 5, "steps": 4, "guidance_scale": 5.0, "sampler": "euler"}


@pytest.fixture(scope="module")
def folder(controlnet_model: Callable[[str], Path]) -> Path:
    return controlnet_model(MODEL)


@pytest.fixture(scope="module")
def server(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("controlnet-server")
    process = ServerProcess("standalone", ["--models-dir", str(folder.parent), "--model", MODEL, "--images-dir",
                                           str(work / "images"), "--backend", "cpu"],  # as `_engines` renders
                            work).start(timeout=180)
    wait_for_models(process, {MODEL})
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def _picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _b64(image: Image.Image) -> str:
    return base64.b64encode(_png(image)).decode()


def _unit(**overrides: object) -> dict[str, object]:
    return {"model": CONTROLNET, "image": "data:image/png;base64," + _b64(_picture(1)), "scale": 1.4,
            "end": 0.6} | overrides


def _pixels(response: object) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))).convert("RGB")).astype(int)


def _engines(folder: Path, **request: object) -> np.ndarray:
    """What the engines render for the same request, in this process."""
    pipeline = engines.load(folder, backend="cpu")
    fields = {"prompt": "a lighthouse", "width": SIZE, "height": SIZE} | COMMON | request
    return np.asarray(pipeline.render(engines.RenderRequest(**fields)).images[0]).astype(int)


def test_the_model_card_lists_its_controlnets(client: OpenAI) -> None:
    card = client.models.retrieve(MODEL).to_dict()
    assert card["controlnet_inputs"] is True
    assert card["controlnets"] == [{"name": CONTROLNET, "family": "sd1"}]


def test_generations_with_controlnets_render_what_the_engines_render(client: OpenAI, folder: Path) -> None:
    units = [_unit(), _unit(image=_b64(_picture(2)), scale=0.7, start=0.5, end=1.0, preprocess="canny", low=30,
                            high=90)]  # the second as plain base64
    guided = client.images.generate(model=MODEL, prompt="a lighthouse", size=f"{SIZE}x{SIZE}",
                                    response_format="b64_json", extra_body=COMMON | {"controlnet": units})
    expected = _engines(folder, controlnet=[
        engines.ControlUnit(name=CONTROLNET, image=_picture(1), scale=1.4, end=0.6),
        engines.ControlUnit(name=CONTROLNET, image=_picture(2), scale=0.7, start=0.5, preprocess="canny", low=30,
                            high=90)])
    assert np.abs(_pixels(guided) - expected).max() <= 1
    plain = client.images.generate(model=MODEL, prompt="a lighthouse", size=f"{SIZE}x{SIZE}",
                                   response_format="b64_json", extra_body=COMMON)
    assert np.abs(_pixels(plain) - expected).max() > 5


def test_edits_and_variations_take_the_list_as_json_text(client: OpenAI, folder: Path) -> None:
    field = {"controlnet": json.dumps([_unit()])}
    edited = client.images.edit(model=MODEL, image=("in.png", _png(_picture(7)), "image/png"), prompt="a lighthouse",
                                size=f"{SIZE}x{SIZE}", response_format="b64_json",
                                extra_body={k: str(v) for k, v in COMMON.items()} | field | {"strength": "0.8"})
    unit = engines.ControlUnit(name=CONTROLNET, image=_picture(1), scale=1.4, end=0.6)
    expected = _engines(folder, image=_picture(7), strength=0.8, controlnet=[unit])
    assert np.abs(_pixels(edited) - expected).max() <= 1
    varied = client.images.create_variation(model=MODEL, image=("in.png", _png(_picture(7)), "image/png"),
                                            size=f"{SIZE}x{SIZE}", response_format="b64_json",
                                            extra_body={k: str(v) for k, v in COMMON.items()} | field)
    expected = _engines(folder, prompt="", image=_picture(7), strength=0.6, controlnet=[unit])
    assert np.abs(_pixels(varied) - expected).max() <= 1


@pytest.mark.parametrize(("units", "code", "says"), [
    ([_unit(model="depth")], "controlnet_not_found", "no ControlNet 'depth'"),
    ([_unit()] * 5, "invalid_controlnet", "4"),
    ([_unit(scale=2.5)], "invalid_controlnet", "2"),
    ([_unit(start=0.7, end=0.2)], "invalid_controlnet", "start (0.7) must be below end (0.2)"),
    ([_unit(image="not an image")], "invalid_controlnet", "base64"),
    ([_unit(image="data:image/png;base64," + base64.b64encode(b"not a png").decode())], "invalid_image", ""),
    ([_unit(preprocess="depth")], "invalid_controlnet", "depth"),
], ids=["unknown", "too many", "scale", "window", "not base64", "not an image", "preprocess"])
def test_bad_units_are_400s_naming_the_field(client: OpenAI, units: list, code: str, says: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model=MODEL, prompt="a", size=f"{SIZE}x{SIZE}", extra_body={"controlnet": units})
    error = caught.value.body  # a bound the body's schema declares names the unit's field: controlnet[0].scale
    assert error["param"].split("[")[0] == "controlnet" and error["code"].startswith(code), error
    assert says in error["message"], error
