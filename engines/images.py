"""Pixels in and out of the pipeline: PIL images ↔ the arrays the VAE reads and writes.

Conventions follow diffusers' VaeImageProcessor so that the same inputs give the same latents: images
are RGB scaled to [-1, 1] (NCHW), masks are single-channel, binarized at 0.5, 1 = repaint.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

from engines.errors import InvalidRequest


def decoded(param: str, convert: Callable[[], np.ndarray], field: str | None = None) -> np.ndarray:
    """`convert()`, where a truncated or corrupt image is InvalidRequest(param): PIL decodes lazily, so it
    fails only when its pixels are read. `field` names the image where `param` holds several (a unit's)."""
    try:
        return convert()
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's decoders raise all three
        raise InvalidRequest(param, f"{field or param} cannot be decoded: {exc}") from exc


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Center-crop to the target aspect ratio, then resize: any input size renders, never distorted."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)


def to_array(image: Image.Image, width: int, height: int) -> np.ndarray:
    """(1, 3, H, W) float32 in [-1, 1]."""
    rgb = np.asarray(fit(image.convert("RGB"), width, height), dtype=np.float32) / 255.0
    return (rgb * 2.0 - 1.0).transpose(2, 0, 1)[None]


def mask_to_array(mask: Image.Image, width: int, height: int) -> np.ndarray:
    """(1, 1, H, W) float32 of 0 and 1 (1 = repaint)."""
    gray = np.asarray(fit(mask.convert("L"), width, height), dtype=np.float32) / 255.0
    return (gray >= 0.5).astype(np.float32)[None, None]


def to_pixels(decoded: np.ndarray) -> np.ndarray:
    """VAE output (N, 3, H, W) in [-1, 1] → (N, H, W, 3) float32 in [0, 1]."""
    return np.clip(decoded / 2.0 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


def to_pil(pixels: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray((p * 255.0).round().astype(np.uint8)) for p in pixels]
