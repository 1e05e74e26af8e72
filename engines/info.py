"""What a loaded model can do, for the server and the CLIs."""

from __future__ import annotations

import msgspec

from engines import limits
from engines import manifest as mf


class AdapterInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A LoRA adapter a model offers: requests name it; `parts` are the components it changes."""

    name: str
    rank: int
    parts: list[str]
    format: str  # "diffusers" or "kohya"


class ControlNetInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A ControlNet a model offers: requests name it in `ControlUnit.name`."""

    name: str
    family: mf.Family
    source: str  # the preset, hub id, folder or file it was exported from
    sha256: str = ""  # its graph's (model.json): sd-webui-controlnet's names end in " [first 8 hex digits]"


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str  # the model directory's name: the `model` field of API requests
    name: str  # the preset it was exported as
    family: mf.Family
    variant: mf.Variant
    prediction_type: mf.PredictionType
    sizes: mf.Sizes
    defaults: mf.Defaults
    max_batch: int
    inpainting_unet: bool  # a 9-channel UNet (masks condition it directly)
    samplers: tuple[str, ...]
    backend: str  # the backend actually in use
    device: str
    tiny_decoder: bool = False  # a TAESD decoder beside the VAE: previews, and `decoder: "tiny"` per request
    lora_rank: int = 0  # largest total adapter rank per request; 0: exported without LoRA support
    adapters: list[AdapterInfo] = []
    refused_adapters: dict[str, str] = {}  # adapter name → why this model cannot take it
    controlnet_inputs: bool = False  # its UNet takes ControlNet residuals (exported with --controlnet)
    controlnets: list[ControlNetInfo] = []
    refused_controlnets: dict[str, str] = {}  # ControlNet name → why this model cannot use it

    def rows(self, n: int, guidance_scale: float) -> int:
        """UNet rows each step of a request takes: its images (at most a chunk of `max_batch`), twice when
        guided. What batching packs into one call."""
        return min(n, self.max_batch) * limits.rows_per_image(guidance_scale)
