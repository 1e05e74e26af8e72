"""The models `python -m export PRESET` knows: where each comes from and how it is served by default."""

from __future__ import annotations

from dataclasses import dataclass

from engines.manifest import Defaults, Family, Sizes, Variant
from export.errors import ExportError


@dataclass(frozen=True)
class Preset:
    name: str
    family: Family
    variant: Variant
    description: str
    hub_id: str | None  # default source; None for presets built from random weights
    sizes: Sizes
    defaults: Defaults
    max_batch: int = 4
    random_seed: int | None = None  # set for random-weight presets (tiny-*, random-*)

    @property
    def is_random(self) -> bool:
        return self.random_seed is not None


def _defaults(size: int, steps: int, guidance: float, sampler: str) -> Defaults:
    return Defaults(width=size, height=size, steps=steps, guidance_scale=guidance, sampler=sampler)


# The SD UNets halve the 1/8-scale latent three times: sizes step by 8 * 2**3 = 64 pixels.
_SD_SIZES = Sizes(min=256, max=1024, step=64)
_SDXL_SIZES = Sizes(min=512, max=2048, step=64)
# The tiny UNets halve the latent once: 8 * 2 = 16 pixels.
_TINY_SIZES = Sizes(min=64, max=512, step=16)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("sd15", "sd1", "base", "Stable Diffusion 1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5",
               _SD_SIZES, _defaults(512, 30, 7.5, "dpmpp_2m")),
        Preset("sd15-inpaint", "sd1", "inpaint", "Stable Diffusion 1.5 inpainting (9-channel UNet)",
               "stable-diffusion-v1-5/stable-diffusion-inpainting", _SD_SIZES, _defaults(512, 30, 7.5, "dpmpp_2m")),
        Preset("sd21", "sd2", "base", "Stable Diffusion 2.1 (768, v-prediction)", "stabilityai/stable-diffusion-2-1",
               _SD_SIZES, _defaults(768, 30, 7.5, "dpmpp_2m")),
        Preset("sdxl", "sdxl", "base", "Stable Diffusion XL 1.0 base", "stabilityai/stable-diffusion-xl-base-1.0",
               _SDXL_SIZES, _defaults(1024, 30, 5.0, "dpmpp_2m"), max_batch=2),
        Preset("sdxl-inpaint", "sdxl", "inpaint", "Stable Diffusion XL 1.0 inpainting (9-channel UNet)",
               "diffusers/stable-diffusion-xl-1.0-inpainting-0.1", _SDXL_SIZES, _defaults(1024, 30, 5.0, "dpmpp_2m"),
               max_batch=2),
        Preset("sd-turbo", "sd2", "turbo", "SD-Turbo (distilled SD 2.1, 1-4 steps, no guidance)",
               "stabilityai/sd-turbo", _SD_SIZES, _defaults(512, 1, 0.0, "euler")),
        Preset("sdxl-turbo", "sdxl", "turbo", "SDXL-Turbo (distilled SDXL, 1-4 steps, no guidance)",
               "stabilityai/sdxl-turbo", Sizes(min=512, max=1024, step=64), _defaults(512, 1, 0.0, "euler_a"),
               max_batch=2),
        Preset("tiny-sd15", "sd1", "base", "random-weight SD 1.x architecture at tiny size (tests, offline demo)",
               None, _TINY_SIZES, _defaults(256, 8, 7.5, "euler"), random_seed=0),
        Preset("tiny-sd15-inpaint", "sd1", "inpaint", "random-weight 9-channel inpainting SD 1.x at tiny size",
               None, _TINY_SIZES, _defaults(256, 8, 7.5, "euler"), random_seed=1),
        Preset("tiny-sd21", "sd2", "base", "random-weight SD 2.x (v-prediction) at tiny size",
               None, _TINY_SIZES, _defaults(256, 8, 7.5, "euler"), random_seed=2),
        Preset("tiny-sdxl", "sdxl", "base", "random-weight SDXL architecture at tiny size (two text encoders)",
               None, _TINY_SIZES, _defaults(256, 8, 5.0, "euler"), random_seed=3),
        # The real architectures with seeded random weights: real cost without a download (bench).
        Preset("random-sd15", "sd1", "base", "random-weight SD 1.5 architecture at full size (benchmarks)",
               None, _SD_SIZES, _defaults(512, 30, 7.5, "dpmpp_2m"), random_seed=10),
        Preset("random-sd21", "sd2", "base", "random-weight SD 2.1 / SD-Turbo architecture at full size (benchmarks)",
               None, _SD_SIZES, _defaults(768, 30, 7.5, "dpmpp_2m"), random_seed=11),
        Preset("random-sdxl", "sdxl", "base", "random-weight SDXL architecture at full size (benchmarks)",
               None, _SDXL_SIZES, _defaults(1024, 30, 5.0, "dpmpp_2m"), max_batch=2, random_seed=12),
    )
}


def get(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ExportError(f"unknown preset {name!r}; one of: {', '.join(PRESETS)}") from None
