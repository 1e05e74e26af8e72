"""Parity with diffusers: same weights, same starting noise and random draws → the same pixels.

The reference is the PyTorch pipeline the tiny model was exported from. Its random draws are recorded by
wrapping diffusers' `randn_tensor` (a spy on the reference: the values it draws are unchanged) and classed
by the function that asked for them; our pipeline then receives exactly those arrays.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)
from diffusers.utils import torch_utils
from PIL import Image

import engines
from bench.reference import diffusers_scheduler
from export import presets, tiny
from tests.conftest import TINY

WIDTH, HEIGHT, STEPS = 64, 80, 4
PROMPT, NEGATIVE = "a photo of a red cat sitting on a wooden chair", "blurry, low quality"
TOLERANCE = 1e-4  # max pixel difference on a 0-1 scale
MODES = ("txt2img", "img2img", "inpaint")


@contextmanager
def recorded_draws() -> Iterator[dict[str, list[np.ndarray]]]:
    """Record every `randn_tensor` draw of the diffusers reference, classed by who asked."""
    original = torch_utils.randn_tensor
    draws: dict[str, list[np.ndarray]] = {"latents": [], "posterior": [], "masked_posterior": [], "steps": []}

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        value = original(*args, **kwargs)
        callers = set()
        frame = sys._getframe(1)
        while frame is not None:
            callers.add(frame.f_code.co_name)
            frame = frame.f_back
        if "step" in callers:
            kind = "steps"
        elif "prepare_mask_latents" in callers:
            kind = "masked_posterior"
        elif "sample" in callers:  # DiagonalGaussianDistribution.sample
            kind = "posterior"
        else:
            kind = "latents"
        draws[kind].append(value.detach().numpy().copy())
        return value

    patched = [m for m in list(sys.modules.values())
               if getattr(m, "__name__", "").startswith("diffusers") and getattr(m, "randn_tensor", None) is original]
    for module in patched:
        module.randn_tensor = spy
    try:
        yield draws
    finally:
        for module in patched:
            module.randn_tensor = original


def input_image() -> Image.Image:
    rng = np.random.default_rng(42)
    return Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def input_mask(kind: str) -> Image.Image:
    """White = repaint (the engines' convention; the server converts OpenAI alpha masks to it)."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    if kind == "all":
        mask[:] = 255
    elif kind == "box":
        mask[16:56, 8:40] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def references() -> dict[str, object]:
    return {name: tiny.build(presets.get(name)) for name in TINY}


@pytest.fixture(scope="module")
def pipelines(tiny_model: Callable[[str], Path]) -> dict[str, engines.Pipeline]:
    return {name: engines.load(tiny_model(name), backend="cpu") for name in TINY}


def reference_call(base: object, name: str, mode: str, sampler: str, guidance: float,
                   negative: str | None, strength: float) -> tuple[object, dict[str, object]]:
    """The diffusers pipeline and arguments for one case, and what our RenderRequest gets for it."""
    sdxl = name == "tiny-sdxl"
    inpaint_unet = name.endswith("inpaint")
    args: dict[str, object] = {"prompt": PROMPT, "negative_prompt": negative, "height": HEIGHT, "width": WIDTH,
                               "num_inference_steps": STEPS, "guidance_scale": guidance, "output_type": "np",
                               "generator": torch.Generator().manual_seed(1234)}
    ours: dict[str, object] = {}
    if mode == "txt2img" and not inpaint_unet:
        pipe = type(base).from_pipe(base)  # a copy: the scheduler is swapped below
    elif mode == "img2img" and not inpaint_unet:
        pipe = (StableDiffusionXLImg2ImgPipeline if sdxl else StableDiffusionImg2ImgPipeline).from_pipe(base)
        args |= {"image": input_image(), "strength": strength}
        ours = {"image": input_image(), "strength": strength}
    else:  # inpainting, and every mode of a 9-channel inpainting UNet (full mask = text to image)
        pipe = (StableDiffusionXLInpaintPipeline if sdxl else StableDiffusionInpaintPipeline).from_pipe(base)
        kind = {"txt2img": "all", "img2img": "none", "inpaint": "box"}[mode]
        args |= {"image": input_image(), "mask_image": input_mask(kind), "strength": strength}
        if mode == "img2img":
            ours = {"image": input_image(), "strength": strength}
        elif mode == "inpaint":
            ours = {"image": input_image(), "mask": input_mask("box"), "strength": strength}
        # text to image on our side takes no image: the UNet sees a fully masked one, as diffusers' here
    pipe.scheduler = diffusers_scheduler(sampler, dict(base.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe, args | {"_ours": ours}


def run_pair(pipeline: engines.Pipeline, base: object, name: str, mode: str, sampler: str, *,
             guidance: float = 6.0, negative: str | None = NEGATIVE, strength: float | None = None) -> float:
    strength = strength if strength is not None else {"txt2img": 1.0, "img2img": 0.6, "inpaint": 0.75}[mode]
    pipe, args = reference_call(base, name, mode, sampler, guidance, negative, strength)
    ours = args.pop("_ours")
    with recorded_draws() as draws, torch.no_grad():
        expected = pipe(**args).images
    assert len(draws["latents"]) == 1
    request = engines.RenderRequest(prompt=PROMPT, negative_prompt=negative, width=WIDTH, height=HEIGHT,
                                    steps=STEPS, guidance_scale=guidance, sampler=sampler, seed=0, **ours)
    noise = engines.Noise(posterior=(draws["posterior"] or [None])[0],
                          masked_posterior=(draws["masked_posterior"] or [None])[0],
                          steps=draws["steps"] or None)
    result = pipeline.render(request, latents=draws["latents"][0], noise=noise)
    assert result.pixels.shape == expected.shape == (1, HEIGHT, WIDTH, 3)
    return float(np.abs(result.pixels - expected).max())


@pytest.mark.parametrize("sampler", engines.SAMPLERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", TINY)
def test_parity_with_diffusers(pipelines: dict, references: dict, name: str, mode: str, sampler: str) -> None:
    difference = run_pair(pipelines[name], references[name], name, mode, sampler)
    assert difference <= TOLERANCE, f"{name} {mode} {sampler}: max pixel difference {difference:.2e}"


@pytest.mark.parametrize("name", TINY)
def test_parity_without_guidance(pipelines: dict, references: dict, name: str) -> None:
    """guidance ≤ 1 runs the UNet on the conditional half only (Turbo models render this way)."""
    difference = run_pair(pipelines[name], references[name], name, "txt2img", "euler", guidance=1.0)
    assert difference <= TOLERANCE


def test_parity_sdxl_without_negative_prompt(pipelines: dict, references: dict) -> None:
    """SDXL's force_zeros_for_empty_prompt: no negative prompt means zero negative conditioning."""
    difference = run_pair(pipelines["tiny-sdxl"], references["tiny-sdxl"], "tiny-sdxl", "txt2img", "dpmpp_2m",
                          negative=None)
    assert difference <= TOLERANCE


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sd15-inpaint", "tiny-sdxl"])
def test_parity_inpainting_at_full_strength(pipelines: dict, references: dict, name: str) -> None:
    difference = run_pair(pipelines[name], references[name], name, "inpaint", "euler_a", strength=1.0)
    assert difference <= TOLERANCE
