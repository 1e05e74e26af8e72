"""ControlNet renders against diffusers: the tiny models exported with `--controlnet` and their ControlNets
(the preset, and a second one with other weights exported from a diffusers folder) render as diffusers'
`StableDiffusion(XL)ControlNetPipeline`, its img2img sibling and MultiControlNet (a list of ControlNets) do
with the same PyTorch weights and the same random draws, within 1/255, start/end windows included."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPipeline,
)
from PIL import Image

import engines
from bench.reference import diffusers_scheduler
from engines import manifest as mf
from engines.render import ControlUnit
from export import ExportSettings, export_model, presets, tiny
from export import controlnet as cn
from export.controlnet import ControlNetSettings, export_controlnet
from tests import adapters
from tests.engines.test_parity import (
    HEIGHT,
    NEGATIVE,
    PROMPT,
    STEPS,
    WIDTH,
    input_image,
    input_mask,
    recorded_draws,
)

TOLERANCE = 1 / 255  # max pixel difference on a 0-1 scale
NAMES = ("tiny-sd15", "tiny-sdxl")
SECOND = "second"  # the second ControlNet's name: other weights than the preset's


def control_map(seed: int) -> Image.Image:
    """A control image: bars and noise, so that the ControlNet sees structure."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[::8] = 255
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def models(controlnet_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny model with `--controlnet`, its ControlNet preset and SECOND (a copy: the shared model stays
    as the conftest made it)."""
    folders = {}
    for name in NAMES:
        target = tmp_path_factory.mktemp("controlnets") / name
        shutil.copytree(controlnet_model(name), target)
        preset = cn.PRESETS[_preset(name)]
        second = cn.Preset(SECOND, name, preset.seed + 100, preset.embedding_channels)
        source = target.parent / "second-source"
        cn.random_controlnet(second).save_pretrained(source)
        export_controlnet(ControlNetSettings(source=str(source), model_dir=str(target), name=SECOND))
        folders[name] = target
    return folders


@pytest.fixture(scope="module")
def pipelines(models: dict[str, Path]) -> dict[str, engines.Pipeline]:
    return {name: engines.load(folder, backend="cpu") for name, folder in models.items()}


@pytest.fixture(scope="module")
def references(models: dict[str, Path]) -> dict[str, tuple[object, dict[str, object]]]:
    """The diffusers base pipeline of each model and its ControlNets as PyTorch modules, rebuilt from the sources
    the manifest records."""
    found = {}
    for name, folder in models.items():
        manifest = mf.read(folder)
        found[name] = (tiny.build(presets.get(name)),
                       {key: cn.reference(entry.source) for key, entry in manifest.controlnets.items()})
    return found


def _preset(name: str) -> str:
    return f"tiny-controlnet-{'sdxl' if name == 'tiny-sdxl' else 'sd15'}"


def _kind(sdxl: bool, image: Image.Image | None, mask: Image.Image | None) -> type:
    if mask is not None:
        return StableDiffusionControlNetInpaintPipeline
    if image is not None:
        return StableDiffusionXLControlNetImg2ImgPipeline if sdxl else StableDiffusionControlNetImg2ImgPipeline
    return StableDiffusionXLControlNetPipeline if sdxl else StableDiffusionControlNetPipeline


def run_pair(pipeline: engines.Pipeline, reference: tuple[object, dict[str, object]], name: str,
             units: list[ControlUnit], *, sampler: str = "euler", image: Image.Image | None = None,
             mask: Image.Image | None = None, strength: float = 0.6, guidance: float = 6.0,
             lora: list[tuple[str, float]] | None = None) -> float:
    """Our render of `units` and diffusers' ControlNet pipeline with the same ControlNets, control images,
    scales and windows (canny maps drawn by OpenCV on diffusers' side), from the same draws."""
    base, modules = reference
    nets = [modules[u.name] for u in units]
    maps = [Image.fromarray(np.repeat(cv2.Canny(np.asarray(u.image), u.low, u.high)[:, :, None], 3, axis=2))
            if u.preprocess == "canny" else u.image for u in units]
    pipe = _kind(name == "tiny-sdxl", image, mask).from_pipe(base, controlnet=nets[0] if len(nets) == 1 else nets)
    pipe.scheduler = diffusers_scheduler(sampler, dict(base.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    one = len(units) == 1
    args: dict[str, object] = {
        "prompt": PROMPT, "negative_prompt": NEGATIVE, "height": HEIGHT, "width": WIDTH,
        "num_inference_steps": STEPS, "guidance_scale": guidance, "output_type": "np",
        "generator": torch.Generator().manual_seed(1234),
        "controlnet_conditioning_scale": units[0].scale if one else [u.scale for u in units],
        "control_guidance_start": units[0].start if one else [u.start for u in units],
        "control_guidance_end": units[0].end if one else [u.end for u in units]}
    ours: dict[str, object] = {}
    if image is not None:
        args |= {"image": image, "control_image": maps[0] if one else maps, "strength": strength}
        ours = {"image": image, "strength": strength}
    else:
        args["image"] = maps[0] if one else maps
    if mask is not None:
        args["mask_image"], ours["mask"] = mask, mask
    with recorded_draws() as draws, torch.no_grad():
        expected = pipe(**args).images
    request = engines.RenderRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=WIDTH, height=HEIGHT, steps=STEPS,
                                    guidance_scale=guidance, sampler=sampler, seed=0, controlnet=units,
                                    lora=lora or [], **ours)
    noise = engines.Noise(posterior=(draws["posterior"] or [None])[0], steps=draws["steps"] or None)
    result = pipeline.render(request, latents=draws["latents"][0], noise=noise)
    assert result.pixels.shape == expected.shape == (1, HEIGHT, WIDTH, 3)
    return float(np.abs(result.pixels - expected).max())


def _units(name: str, *kinds: str) -> list[ControlUnit]:
    """Units by kind: "one" the preset at 0.8, "second" SECOND at 1.3, "window" the preset on steps 1–2 of 4,
    "canny" SECOND on a canny map."""
    made = {"one": ControlUnit(name=_preset(name), image=control_map(1), scale=0.8),
            "second": ControlUnit(name=SECOND, image=control_map(2), scale=1.3),
            "window": ControlUnit(name=_preset(name), image=control_map(3), scale=1.5, start=0.25, end=0.75),
            "canny": ControlUnit(name=SECOND, image=input_image(), preprocess="canny", low=60, high=140)}
    return [made[kind] for kind in kinds]


@pytest.mark.parametrize("kinds", [("one",), ("one", "second"), ("window",), ("window", "canny")], ids="+".join)
@pytest.mark.parametrize("name", NAMES)
def test_controlnet_parity(pipelines: dict, references: dict, name: str, kinds: tuple[str, ...]) -> None:
    difference = run_pair(pipelines[name], references[name], name, _units(name, *kinds))
    assert difference <= TOLERANCE, f"{name} {kinds}: max pixel difference {difference:.2e}"


@pytest.mark.parametrize("kinds", [("one",), ("window", "second")], ids="+".join)
@pytest.mark.parametrize("name", NAMES)
def test_controlnet_parity_image_to_image(pipelines: dict, references: dict, name: str,
                                          kinds: tuple[str, ...]) -> None:
    difference = run_pair(pipelines[name], references[name], name, _units(name, *kinds), image=input_image())
    assert difference <= TOLERANCE, f"{name} img2img {kinds}: max pixel difference {difference:.2e}"


@pytest.mark.parametrize("sampler", engines.SAMPLERS)
def test_controlnet_parity_every_sampler(pipelines: dict, references: dict, sampler: str) -> None:
    difference = run_pair(pipelines["tiny-sd15"], references["tiny-sd15"], "tiny-sd15",
                          _units("tiny-sd15", "one", "window"), sampler=sampler)
    assert difference <= TOLERANCE, f"{sampler}: max pixel difference {difference:.2e}"


def test_controlnet_parity_without_guidance(pipelines: dict, references: dict) -> None:
    """guidance ≤ 1: one row per image, the ControlNet on the conditional row only."""
    difference = run_pair(pipelines["tiny-sdxl"], references["tiny-sdxl"], "tiny-sdxl",
                          _units("tiny-sdxl", "second"), guidance=1.0)
    assert difference <= TOLERANCE


def test_controlnet_parity_inpainting(pipelines: dict, references: dict) -> None:
    """diffusers' StableDiffusionControlNetInpaintPipeline on a plain UNet: the area outside the mask blended
    back each step, the ControlNet on the UNet's latent input."""
    difference = run_pair(pipelines["tiny-sd15"], references["tiny-sd15"], "tiny-sd15",
                          _units("tiny-sd15", "one", "window"), image=input_image(), mask=input_mask("box"),
                          strength=0.75, sampler="euler_a")
    assert difference <= TOLERANCE


def test_controlnet_parity_with_lora(tmp_path_factory: pytest.TempPathFactory) -> None:
    """LoRA and ControlNet together (diffusers applies the adapter to the UNet and text encoder, not the
    ControlNet, as the engines do): a model exported with --lora-rank and --controlnet."""
    target = tmp_path_factory.mktemp("lora-controlnet") / "tiny-sd15"
    export_model(ExportSettings(preset="tiny-sd15", output=str(target), lora_rank=8, controlnet=True))
    export_controlnet(ControlNetSettings(source=_preset("tiny-sd15"), model_dir=str(target)))
    folder = tmp_path_factory.mktemp("lora-adapters")
    path = adapters.make(folder, "full", "tiny-sd15", ("unet", "text_encoder"), rank=4, alpha=8, seed=3)
    base = tiny.build(presets.get("tiny-sd15"))  # its own: the adapter changes its modules
    base.load_lora_weights(str(path), adapter_name="full")
    base.set_adapters(["full"], adapter_weights=[0.8])
    modules = {_preset("tiny-sd15"): cn.random_controlnet(cn.PRESETS[_preset("tiny-sd15")])}
    pipeline = engines.load(target, backend="cpu", lora_dir=folder)
    difference = run_pair(pipeline, (base, modules), "tiny-sd15", _units("tiny-sd15", "window"),
                          lora=[("full", 0.8)], sampler="dpmpp_2m")
    assert difference <= TOLERANCE
