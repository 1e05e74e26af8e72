"""The tiny decoder: TAESD (diffusers' `AutoencoderTiny`, `madebyollin/taesd` and `taesdxl`) as one more
component of a model directory, `tiny_vae_decoder`.

It decodes the latents the UNet works on (no division by the VAE's scaling factor: TAESD's is 1.0) to
pixels in [-1, 1], like the VAE decoder, at a small fraction of its cost: the engines use it for streaming
partial images and A1111 previews, and per request for the final image where a client asks for speed over
fidelity. Sources: "auto" (the family's TAESD on the hub; seeded random weights for the random-weight
presets), "random", a hub id, or a local folder holding an `AutoencoderTiny` (config.json + weights).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderTiny

from engines import manifest as mf
from export import graphs
from export.errors import ExportError
from export.presets import Preset

COMPONENT = "tiny_vae_decoder"
HUB_IDS = {"sd1": "madebyollin/taesd", "sd2": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}
# Random weights: TAESD's own architecture for the full-size random presets (its real cost), a narrow one
# with one block per level (still ×8) for the tiny test models.
TINY_CONFIG = {"encoder_block_out_channels": (16, 16, 16, 16), "decoder_block_out_channels": (16, 16, 16, 16),
                "num_encoder_blocks": (1, 1, 1, 1), "num_decoder_blocks": (1, 1, 1, 1)}
_RANDOM_SEED = 77


class _Decoder(torch.nn.Module):
    def __init__(self, model: AutoencoderTiny) -> None:
        super().__init__()
        self.model = model

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latent_sample, return_dict=False)[0]


def load(source: str, preset: Preset) -> tuple[AutoencoderTiny, str]:
    """The tiny autoencoder for `preset` from `source`, and the source as the manifest records it."""
    if source == "auto":
        source = "random" if preset.is_random else HUB_IDS[preset.family]
    if source == "random":
        config = TINY_CONFIG if preset.name.startswith("tiny-") else {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_SEED)
            model = AutoencoderTiny(**config)
    else:
        local = Path(source).is_dir()
        try:
            model = AutoencoderTiny.from_pretrained(source, local_files_only=local)
        except Exception as exc:  # diffusers, huggingface_hub and safetensors raise their own types
            where = "the folder" if local else "the hub (or its local cache)"
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"--tiny-decoder: cannot load an AutoencoderTiny from {where} {source}: {reason}") \
                from exc
    if model.config.latent_channels != 4:
        raise ExportError(f"--tiny-decoder {source}: {model.config.latent_channels} latent channels; Stable "
                          "Diffusion's VAEs have 4")
    return model.eval().requires_grad_(False), source


def graph(model: AutoencoderTiny) -> graphs.Graph:
    spatial = {0: graphs.BATCH, 2: "height", 3: "width"}

    def make(shape: graphs.Shape, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {"latent_sample": torch.randn(shape.batch, 4, shape.latent_height, shape.latent_width, generator=gen)}

    return graphs.Graph(COMPONENT, _Decoder(model), ["latent_sample"], ["sample"],
                        {"latent_sample": spatial, "sample": spatial}, make)


def record(model: AutoencoderTiny, source: str) -> mf.TinyDecoder:
    return mf.TinyDecoder(component=COMPONENT, source=source, scaling_factor=float(model.config.scaling_factor))
