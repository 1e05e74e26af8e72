"""The tiny decoder (TAESD): exported from a local `AutoencoderTiny` folder, it decodes as diffusers'
`AutoencoderTiny`, a render asking for it gives what diffusers gives with that decoder in place of the VAE,
and streamed renders preview with it without changing their final image."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline

import engines
from bench.reference import diffusers_scheduler
from engines import images
from engines.backends import openvino
from export import ExportError, ExportSettings, export_model, presets, tiny

Model = Callable[[str], Path]
TOLERANCE = 1e-4  # on 0–1 pixels
BACKENDS = ["cpu", *(["openvino"] if openvino.available() else [])]


def _load(model: Path, backend: str) -> engines.Pipeline:
    return engines.load(model, backend=backend, precision="fp32" if backend == "openvino" else "auto")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_tiny_decoder_decodes_as_autoencoder_tiny(taesd_model: Path, taesd_folder: Path, backend: str) -> None:
    pipeline = _load(taesd_model, backend)
    assert pipeline.info.tiny_decoder and pipeline.manifest.tiny_decoder.source == str(taesd_folder)
    latents = 2 * np.random.default_rng(3).standard_normal((2, 4, 10, 12)).astype(np.float32)
    with torch.no_grad():
        decoded = AutoencoderTiny.from_pretrained(taesd_folder).eval().decode(torch.from_numpy(latents)).sample
    expected = images.to_pixels(decoded.numpy())
    assert np.abs(pipeline.decode_latents(latents, "tiny") - expected).max() <= TOLERANCE
    assert np.abs(pipeline.decode_latents(latents) - expected).max() > 0.05  # the VAE decodes otherwise


def test_a_render_with_the_tiny_decoder_equals_diffusers_with_it(taesd_model: Path, taesd_folder: Path) -> None:
    base = tiny.build(presets.get("tiny-sd15"))
    reference = StableDiffusionPipeline(**{**base.components, "vae": AutoencoderTiny.from_pretrained(taesd_folder)})
    reference.scheduler = diffusers_scheduler("euler", dict(base.scheduler.config))
    reference.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(4).standard_normal((1, 4, 8, 10)).astype(np.float32)
    with torch.no_grad():
        expected = reference(prompt="a red cube", negative_prompt="fog", width=80, height=64, num_inference_steps=4,
                             guidance_scale=6.0, latents=torch.from_numpy(latents), output_type="np").images
    pipeline = engines.load(taesd_model, backend="cpu")
    request = engines.RenderRequest(prompt="a red cube", negative_prompt="fog", width=80, height=64, steps=4,
                                    guidance_scale=6.0, sampler="euler", seed=0, decoder="tiny")
    ours = pipeline.render(request, latents=latents).pixels
    assert np.abs(ours - expected).max() <= TOLERANCE
    full = pipeline.render(msgspec.structs.replace(request, decoder="full"), latents=latents).pixels
    assert np.abs(full - ours).max() > 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_renders_preview_with_the_tiny_decoder(taesd_model: Path, backend: str) -> None:
    pipeline = _load(taesd_model, backend)
    request = engines.RenderRequest(prompt="a lighthouse", width=64, height=64, steps=4, seed=9, n=2)
    seen: dict[str, list[np.ndarray]] = {}
    for mode in ("tiny", "full"):
        got: list[engines.Partial] = []
        final = pipeline.render(request, on_partial=got.append, partial_images=2, preview=mode).pixels
        assert np.array_equal(final, pipeline.render(request).pixels)
        assert [(p.index, p.partial_index) for p in got] == [(0, 0), (1, 0), (0, 1), (1, 1)]
        seen[mode] = [np.asarray(p.image, np.float32) for p in got]
    assert all(np.abs(t - f).mean() > 1 for t, f in zip(seen["tiny"], seen["full"], strict=True))


def test_models_without_a_tiny_decoder_preview_with_the_vae(tiny_model: Model) -> None:
    pipeline = engines.load(tiny_model("tiny-sd15"), backend="cpu")
    request = engines.RenderRequest(prompt="a lighthouse", width=64, height=64, steps=2, seed=9)
    partials = {mode: [] for mode in ("tiny", "full")}
    for mode, got in partials.items():
        pipeline.render(request, on_partial=got.append, partial_images=1, preview=mode)
    assert np.array_equal(np.asarray(partials["tiny"][0].image), np.asarray(partials["full"][0].image))


@pytest.mark.parametrize(("decoder", "message"), [("tiny", "no tiny decoder"), ("taesd", "decoder must be")])
def test_a_decoder_the_model_lacks_is_a_request_error(tiny_model: Model, decoder: str, message: str) -> None:
    pipeline = engines.load(tiny_model("tiny-sd15"), backend="cpu")
    with pytest.raises(engines.InvalidRequest, match=message) as caught:
        pipeline.render(engines.RenderRequest(prompt="a cat", width=64, height=64, steps=1, decoder=decoder))
    assert caught.value.param == "decoder"


def test_a_folder_without_an_autoencoder_tiny_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--tiny-decoder"):
        export_model(ExportSettings(preset="tiny-sd15", output=str(tmp_path / "out"), tiny_decoder=str(tmp_path)))
    assert not (tmp_path / "out").exists()
