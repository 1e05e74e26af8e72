"""The random-* presets are the real architectures: their parameter counts equal the published models'.

Counted on PyTorch's meta device (shapes without memory), so this costs seconds, not the gigabytes of a
real build. The expected counts are the public checkpoints' (sum of every tensor in the hub repositories'
diffusers weights), not numbers produced by this code.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from export import fullsize, presets, source

PUBLISHED = {  # parameters of the public checkpoints
    "sd15_unet": 859_520_964,  # stable-diffusion-v1-5 unet
    "sd21_unet": 865_910_724,  # stabilityai/stable-diffusion-2-1 unet
    "sdxl_unet": 2_567_463_684,  # stabilityai/stable-diffusion-xl-base-1.0 unet
    "vae": 83_653_863,  # the SD/SDXL AutoencoderKL
    "clip_l": 123_060_480,  # openai/clip-vit-large-patch14 text model
    "openclip_h": 340_387_840,  # SD 2.x text_encoder (OpenCLIP ViT-H, 23 layers)
    "openclip_bigg": 694_659_840,  # SDXL text_encoder_2 (OpenCLIP ViT-bigG with projection)
}


def parameters(build: object) -> int:
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("name", "build"), [
    ("sd15_unet", lambda: UNet2DConditionModel(**fullsize.UNET_SD15)),
    ("sd21_unet", lambda: UNet2DConditionModel(**fullsize.UNET_SD21)),
    ("sdxl_unet", lambda: UNet2DConditionModel(**fullsize.UNET_SDXL)),
    ("vae", lambda: AutoencoderKL(**fullsize.VAE)),
    ("clip_l", lambda: fullsize._text_encoder(CLIPTextModel, fullsize.CLIP_L)),
    ("openclip_h", lambda: fullsize._text_encoder(CLIPTextModel, fullsize.OPENCLIP_H)),
    ("openclip_bigg", lambda: fullsize._text_encoder(CLIPTextModelWithProjection, fullsize.OPENCLIP_BIGG)),
])
def test_architecture_matches_the_published_model(name: str, build: object) -> None:
    assert parameters(build) == PUBLISHED[name]


def test_random_presets_are_offline_and_seeded() -> None:
    for name in fullsize.names():
        preset = presets.get(name)
        assert preset.is_random and preset.hub_id is None
    assert len({presets.get(name).random_seed for name in fullsize.names()}) == len(fullsize.names())
    # The dispatch the exporter and the bench reference share: a tiny preset stays tiny.
    assert source.random_pipeline(presets.get("tiny-sd15")).unet.config.block_out_channels == (32, 64)
