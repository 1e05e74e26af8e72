"""What a loaded model can do, for the server and the CLIs."""

from __future__ import annotations

import msgspec

from engines import manifest as mf


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
