"""The tiny decoder through the server: streamed partials drawn by it (the default preview) with the same final
image as without streaming, and the `decoder` extension on the three OpenAI routes, with the stock SDK."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import BadRequestError, OpenAI
from PIL import Image

import engines
from server.a1111.tasks import preview_mode
from tests.processes import ServerProcess
from tests.server.conftest import wait_for_models

TAESD, PLAIN = "tiny-sd15-taesd", "tiny-sd15"
ARGS = {"prompt": "a red kite", "size": "64x64"}
EXTRA = {"seed": 11, "steps": 4}


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.fixture(scope="module")
def server(taesd_model: Path, tiny_model: Callable[[str], Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """On the cpu backend, so that the in-process renders below are the same arithmetic."""
    work = tmp_path_factory.mktemp("taesd-server")
    models = work / "models"
    models.mkdir()
    (models / TAESD).symlink_to(taesd_model)
    (models / PLAIN).symlink_to(tiny_model(PLAIN))
    process = ServerProcess("standalone", ["--models-dir", str(models), "--images-dir", str(work / "images"),
                                           "--backend", "cpu"], work).start()
    wait_for_models(process, {TAESD, PLAIN})
    yield process
    process.stop()


@pytest.fixture(scope="module")
def sdk(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def pipeline(taesd_model: Path) -> engines.Pipeline:
    return engines.load(taesd_model, backend="cpu")


def _request(**fields: object) -> engines.RenderRequest:
    return engines.RenderRequest(prompt=ARGS["prompt"], width=64, height=64, steps=4, seed=11, **fields)


def test_streamed_partials_come_from_the_tiny_decoder(sdk: OpenAI, pipeline: engines.Pipeline) -> None:
    events = list(sdk.images.generate(model=TAESD, stream=True, partial_images=2, **ARGS, extra_body=EXTRA))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    partials: dict[str, list[engines.Partial]] = {"tiny": [], "full": []}
    for mode, got in partials.items():
        pipeline.render(_request(), on_partial=got.append, partial_images=2, preview=mode)
    for event, tiny, full in zip(events[:2], partials["tiny"], partials["full"], strict=True):
        assert np.array_equal(pixels(event.b64_json), np.asarray(tiny.image))
        assert not np.array_equal(pixels(event.b64_json), np.asarray(full.image))
    plain = sdk.images.generate(model=TAESD, response_format="b64_json", **ARGS, extra_body=EXTRA)
    assert base64.b64decode(plain.data[0].b64_json) == base64.b64decode(events[-1].b64_json)


def test_the_decoder_field_on_generations(sdk: OpenAI, pipeline: engines.Pipeline) -> None:
    got = {decoder: pixels(sdk.images.generate(model=TAESD, response_format="b64_json", **ARGS,
                                               extra_body={**EXTRA, "decoder": decoder}).data[0].b64_json)
           for decoder in ("tiny", "full")}
    for decoder, image in got.items():
        assert np.array_equal(image, np.asarray(pipeline.render(_request(decoder=decoder)).images[0]))
    assert not np.array_equal(got["tiny"], got["full"])


def test_the_decoder_field_on_edits_and_variations(server: ServerProcess) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    for route, form in (("edits", {"prompt": "a boat"}), ("variations", {})):
        answers = {decoder: httpx.post(f"{server.url}/v1/images/{route}", timeout=120,
                                       data={**form, "model": TAESD, "size": "64x64", "seed": "3", "steps": "2",
                                             "response_format": "b64_json", "decoder": decoder},
                                       files={"image": ("in.png", buffer.getvalue(), "image/png")})
                   for decoder in ("tiny", "full")}
        assert all(a.status_code == 200 for a in answers.values()), answers["tiny"].text
        assert answers["tiny"].json()["data"][0]["b64_json"] != answers["full"].json()["data"][0]["b64_json"]


@pytest.mark.parametrize(("model", "decoder"), [(PLAIN, "tiny"), (TAESD, "taesd")])
def test_a_decoder_the_model_lacks_is_a_400_naming_the_field(sdk: OpenAI, model: str, decoder: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        sdk.images.generate(model=model, **ARGS, extra_body={**EXTRA, "decoder": decoder})
    assert caught.value.body["param"] == "decoder"


@pytest.mark.parametrize(("kind", "tiny", "mode"), [("TAESD", True, "tiny"), ("TAESD", False, "linear"),
                                                    ("Approx NN", True, "tiny"), ("Approx cheap", True, "linear"),
                                                    ("Full", True, "full"), (None, True, "tiny")])
def test_a1111_previews_take_the_tiny_decoder_where_asked(kind: str | None, tiny: bool, mode: str) -> None:
    """A1111's show_progress_type: its TAESD (and Approx NN) previews by the model's tiny decoder where it has
    one, else the cheap linear map; Full by the VAE; Approx cheap the linear map."""
    options = {} if kind is None else {"show_progress_type": kind}
    assert preview_mode(options, tiny) == mode
