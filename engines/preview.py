"""Pictures of a render in progress: the denoiser's estimate of the final latents (x0) → RGB.

Three ways, chosen per render:

    full    the VAE decoder at full size: the image the render would give if it stopped here. Costs one
            decode per preview (measured in the README).
    tiny    the model's tiny decoder (TAESD, `export --tiny-decoder`): nearly the full decode's picture at
            a small fraction of its cost; models without one preview with `full`.
    linear  a per-cell linear map latent → RGB (3×C matrix and bias), each cell drawn as its 8×8 block:
            blurry colours and shapes at almost no cost. The map is fitted once per model by least
            squares against its own VAE decoder (so it fits any family and fine-tune, random test weights
            included) on smooth random latents, and kept for the pipeline's lifetime.

Neither touches the render's latents: the final image is the same bytes with or without previews.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

log = logging.getLogger("sdserve.engines")

PreviewMode = Literal["full", "linear", "tiny"]
PREVIEW_MODES: tuple[str, ...] = ("full", "linear", "tiny")
_FIT_BLOCKS, _FIT_BLOCK_CELLS = 16, 4  # one 64×64-cell latent of 16×16 smooth blocks
_FIT_SEED = 20251129


@dataclass(frozen=True)
class LinearMap:
    """pixel = weights @ latent + bias per latent cell (scaled latents in, [0, 1] pixels out)."""

    weights: np.ndarray  # (3, C)
    bias: np.ndarray  # (3,)
    r2: float  # how much of the decoder's block-averaged output the map explains

    def apply(self, latents: np.ndarray, scale: int) -> np.ndarray:
        """(N, C, h, w) → (N, h·scale, w·scale, 3) float32 pixels in [0, 1]."""
        rgb = np.einsum("rc,nchw->nhwr", self.weights, latents) + self.bias
        return np.clip(rgb.repeat(scale, axis=1).repeat(scale, axis=2), 0.0, 1.0).astype(np.float32)


def fit_linear_map(decode: Callable[[np.ndarray], np.ndarray], channels: int, scale: int) -> LinearMap:
    """Least squares from each latent cell to the mean colour of the scale×scale pixels it decodes to.
    `decode` is the pipeline's: scaled latents (N, C, h, w) → pixels (N, H, W, 3) in [0, 1]."""
    rng = np.random.default_rng(_FIT_SEED)
    blocks = rng.standard_normal((1, channels, _FIT_BLOCKS, _FIT_BLOCKS)).astype(np.float32)
    latents = blocks.repeat(_FIT_BLOCK_CELLS, axis=2).repeat(_FIT_BLOCK_CELLS, axis=3)  # smooth, as real latents
    pixels = decode(latents)
    n, c, h, w = latents.shape
    pooled = pixels.reshape(n, h, scale, w, scale, 3).mean(axis=(2, 4)).reshape(-1, 3)
    inputs = np.concatenate([latents.transpose(0, 2, 3, 1).reshape(-1, c), np.ones((n * h * w, 1), np.float32)], 1)
    solution, *_ = np.linalg.lstsq(inputs.astype(np.float64), pooled.astype(np.float64), rcond=None)
    residual = pooled - inputs @ solution
    r2 = 1.0 - float(residual.var() / max(float(pooled.var()), 1e-12))
    return LinearMap(weights=solution[:c].T.astype(np.float32), bias=solution[c].astype(np.float32), r2=r2)


class Previewer:
    """One model's previews; `decode(latents, decoder)` is the pipeline's decode (scaled latents → [0, 1]
    pixels, by the VAE or with "tiny" the tiny decoder, which the model has when `tiny`)."""

    def __init__(self, decode: Callable[..., np.ndarray], channels: int, scale: int, tiny: bool = False) -> None:
        self._decode, self.channels, self.scale, self.tiny = decode, channels, scale, tiny
        self._linear: LinearMap | None = None
        self._lock = threading.Lock()

    def linear_map(self) -> LinearMap:
        with self._lock:  # render threads share the pipeline: fit once
            if self._linear is None:
                self._linear = fit_linear_map(self._decode, self.channels, self.scale)
                log.info("linear preview map fitted (R² %.2f)", self._linear.r2)
            return self._linear

    def pixels(self, denoised: np.ndarray, mode: PreviewMode) -> np.ndarray:
        """Scaled x0 latents (N, C, h, w) → (N, H, W, 3) pixels in [0, 1]."""
        if mode == "linear":
            return self.linear_map().apply(denoised, self.scale)
        return self._decode(denoised, "tiny" if mode == "tiny" and self.tiny else "full")
