"""ControlNet in the engines: a model exported with `--controlnet` renders without ControlNet exactly as the
plain export of the same weights (its residual inputs fed zeros); renders with ControlNet units share UNet
calls with renders that have other units or none and give what they give alone; windows, scale 0 and
previews behave; bad units are refused naming the field. Parity with diffusers: test_controlnet_parity."""

from __future__ import annotations

import hashlib
import io
import shutil
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest
from PIL import Image

import engines
from engines import limits
from engines.info import ControlNetInfo
from engines.render import ControlUnit
from tests.engines import batches

Model = Callable[[str], Path]


def _request(**overrides: object) -> engines.RenderRequest:
    fields = {"prompt": "a lighthouse at dusk", "negative_prompt": "", "width": 64, "height": 96, "steps": 3,
              "guidance_scale": 5.0, "sampler": "euler", "seed": 7, "n": 2} | overrides
    return engines.RenderRequest(**fields)


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_a_controlnet_export_renders_without_controlnet_as_the_plain_export(
        controlnet_model: Model, tiny_model: Model, name: str) -> None:
    with_inputs = engines.load(controlnet_model(name), backend="cpu")
    plain = engines.load(tiny_model(name), backend="cpu")
    assert with_inputs.manifest.residuals is not None and plain.manifest.residuals is None
    for request in (_request(), _request(width=80, height=64, n=1, sampler="dpmpp_2m")):
        ours, theirs = with_inputs.render(request), plain.render(request)
        np.testing.assert_allclose(ours.pixels, theirs.pixels, atol=1e-5)


# -- renders with ControlNets ------------------------------------------------------------------------------


def _map(seed: int, width: int = 64, height: int = 96) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _unit(model: str, **overrides: object) -> ControlUnit:
    fields = {"name": _preset(model), "image": _map(1), "scale": 1.0} | overrides
    return ControlUnit(**fields)


def _preset(name: str) -> str:
    return f"tiny-controlnet-{'sdxl' if name == 'tiny-sdxl' else 'sd15'}"


@pytest.fixture(scope="module")
def pipelines(controlnet_model: Model) -> dict[str, engines.Pipeline]:
    return {name: engines.load(controlnet_model(name), backend="cpu") for name in ("tiny-sd15", "tiny-sdxl")}


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_batched_controlnet_renders_equal_alone(pipelines: dict[str, engines.Pipeline], name: str) -> None:
    """Renders with other ControlNet units, other windows, image to image, or none at all share UNet calls and
    give what they give alone; the ControlNet changes the image (so sharing could have mixed them up)."""
    pipeline = pipelines[name]
    mix = [(0, _request(controlnet=[_unit(name)])),
           (0, _request(seed=8, n=1)),
           (1, _request(seed=9, sampler="euler_a", controlnet=[_unit(name, image=_map(2), scale=1.7, start=0.3),
                                                                _unit(name, image=_map(3), scale=0.4, end=0.6)])),
           (1, _request(seed=10, n=1, image=_map(4), strength=0.9, steps=5,
                        controlnet=[_unit(name, image=_map(5), preprocess="canny", low=40, high=90)]))]
    renderings, calls = batches.run(pipeline, [(call, lambda r=r: pipeline.begin(r)) for call, r in mix])
    for index, (rendering, (_, alone)) in enumerate(zip(renderings, mix, strict=True)):
        expected = pipeline.render(alone).pixels
        np.testing.assert_allclose(rendering.result().pixels, expected, atol=1e-5, err_msg=f"request {index}")
        assert any(index in call and len(call) > 1 for call in calls), f"request {index} never shared a call"
    assert max(len(call) for call in calls) == len(mix)
    plain = pipeline.render(msgspec.structs.replace(mix[0][1], controlnet=[])).pixels
    assert np.abs(plain - renderings[0].result().pixels).max() > 0.02


def test_a_unit_outside_its_window_and_at_scale_zero_changes_nothing(pipelines: dict[str, engines.Pipeline]) -> None:
    """start/end select the steps (diffusers' controlnet_keep); a unit whose window holds no step of the
    schedule, or whose scale is 0, renders the plain image."""
    pipeline = pipelines["tiny-sd15"]
    plain = pipeline.render(_request(steps=4)).pixels
    for unit in (_unit("tiny-sd15", start=0.9), _unit("tiny-sd15", end=0.2), _unit("tiny-sd15", scale=0.0)):
        np.testing.assert_allclose(pipeline.render(_request(steps=4, controlnet=[unit])).pixels, plain, atol=1e-6)
    windowed = pipeline.render(_request(steps=4, controlnet=[_unit("tiny-sd15", start=0.5)])).pixels
    assert np.abs(windowed - plain).max() > 0.01


def test_streaming_partials_follow_the_controlnet(pipelines: dict[str, engines.Pipeline]) -> None:
    """Previews of a guided render show the guided latents: its last preview is its image."""
    pipeline = pipelines["tiny-sd15"]
    got: list[engines.Partial] = []
    request = _request(n=1, steps=4, controlnet=[_unit("tiny-sd15")])
    result = pipeline.render(request, on_partial=got.append, partial_images=2)
    plain = pipeline.render(msgspec.structs.replace(request, controlnet=[]), on_partial=lambda p: None,
                            partial_images=2)
    assert len(got) == 2
    last = np.asarray(got[-1].image).astype(int)
    assert np.abs(last - np.asarray(result.images[0]).astype(int)).max() <= 1
    assert np.abs(last - np.asarray(plain.images[0]).astype(int)).max() > 3


# -- refusals -------------------------------------------------------------------------------------------


def _refusal(pipeline: engines.Pipeline, **overrides: object) -> engines.InvalidRequest:
    with pytest.raises(engines.InvalidRequest) as caught:
        pipeline.render(_request(n=1, steps=1, **overrides))
    return caught.value


def test_refusals_name_the_field(pipelines: dict[str, engines.Pipeline], tiny_model: Model) -> None:
    pipeline = pipelines["tiny-sd15"]
    unknown = _refusal(pipeline, controlnet=[_unit("tiny-sd15", name="depth")])
    assert (unknown.param, unknown.code) == ("controlnet", "controlnet_not_found")
    assert "'depth'" in unknown.message and "tiny-controlnet-sd15" in unknown.message
    too_many = _refusal(pipeline, controlnet=[_unit("tiny-sd15")] * (limits.MAX_CONTROLNETS + 1))
    assert too_many.param == "controlnet" and f"at most {limits.MAX_CONTROLNETS}" in too_many.message
    for field, value in (("scale", 2.5), ("scale", -0.1), ("scale", float("nan")), ("start", -0.5), ("end", 1.5)):
        refused = _refusal(pipeline, controlnet=[_unit("tiny-sd15"), _unit("tiny-sd15", **{field: value})])
        assert refused.param == "controlnet" and f"controlnet[1].{field}" in refused.message, (field, value)
    backwards = _refusal(pipeline, controlnet=[_unit("tiny-sd15", start=0.6, end=0.4)])
    assert "start (0.6) must be below end (0.4)" in backwards.message
    preprocess = _refusal(pipeline, controlnet=[_unit("tiny-sd15", preprocess="depth")])
    assert "controlnet[0].preprocess" in preprocess.message
    threshold = _refusal(pipeline, controlnet=[_unit("tiny-sd15", preprocess="canny", high=300)])
    assert "controlnet[0].high" in threshold.message
    broken = io.BytesIO()
    _map(1).save(broken, "PNG")
    truncated = Image.open(io.BytesIO(broken.getvalue()[:200]))
    bad_image = _refusal(pipeline, controlnet=[_unit("tiny-sd15", image=truncated)])
    assert bad_image.param == "controlnet" and "controlnet[0].image cannot be decoded" in bad_image.message
    not_pil = _refusal(pipeline, controlnet=[_unit("tiny-sd15", image="data:image/png;base64,AAAA")])
    assert "controlnet[0].image must be a PIL image" in not_pil.message
    # a model exported before ControlNet support (or without --controlnet): how to re-export it
    old = engines.load(tiny_model("tiny-sd15"), backend="cpu")
    assert not old.info.controlnet_inputs and old.info.controlnets == []
    unsupported = _refusal(old, controlnet=[_unit("tiny-sd15")])
    assert (unsupported.param, unsupported.code) == ("controlnet", "controlnet_unsupported")
    assert "python -m export … --controlnet" in unsupported.message


def test_the_pipeline_lists_its_controlnets(pipelines: dict[str, engines.Pipeline], controlnet_model: Model) -> None:
    info = pipelines["tiny-sdxl"].info
    graph = controlnet_model("tiny-sdxl") / "controlnets" / "tiny-controlnet-sdxl" / "model.onnx"
    assert info.controlnet_inputs
    assert info.controlnets == [ControlNetInfo(name="tiny-controlnet-sdxl", family="sdxl",
                                               source="tiny-controlnet-sdxl",
                                               sha256=hashlib.sha256(graph.read_bytes()).hexdigest())]
    assert info.refused_controlnets == {}


def test_a_broken_controlnet_costs_itself(controlnet_model: Model, tmp_path: Path) -> None:
    """A ControlNet whose graph was altered is refused with its reason; the model and its plain renders load."""
    folder = tmp_path / "tiny-sd15"
    shutil.copytree(controlnet_model("tiny-sd15"), folder)
    graph = folder / "controlnets" / "tiny-controlnet-sd15" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    pipeline = engines.load(folder, backend="cpu")
    assert pipeline.info.controlnets == []
    assert "does not match its sha256" in pipeline.info.refused_controlnets["tiny-controlnet-sd15"]
    refused = _refusal(pipeline, controlnet=[_unit("tiny-sd15")])
    assert (refused.param, refused.code) == ("controlnet", "controlnet_incompatible")
    pipeline.render(_request(n=1, steps=1))
