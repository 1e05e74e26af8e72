"""The random draws of a render, per image, so that image i of seed s is image 0 of seed s + i.

Each image owns a generator seeded with its own seed and draws in a fixed order: the starting noise,
then the VAE posterior samples it needs, then one array per sampler step that wants fresh noise. A
caller that wants to reproduce another implementation exactly passes the arrays instead (`Noise`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engines.errors import InvalidRequest


@dataclass(frozen=True)
class Noise:
    """Explicit draws for a whole batch (first axis = image). Any field left None is drawn from the seeds.

    posterior:        ε of the VAE encoder's sample of the input image (image to image, inpainting)
    masked_posterior: ε of the VAE encoder's sample of the masked image (9-channel inpainting UNets)
    steps:            one array per sampler step that draws noise (euler_a, lcm), in step order
    """

    posterior: np.ndarray | None = None
    masked_posterior: np.ndarray | None = None
    steps: list[np.ndarray] | None = None


class SeededNoise:
    """Per-image generators for one chunk of a request."""

    def __init__(self, seeds: list[int], latent_shape: tuple[int, int, int]) -> None:
        self._generators = [np.random.Generator(np.random.PCG64(seed)) for seed in seeds]
        self.shape = latent_shape

    def draw(self) -> np.ndarray:
        """One standard normal latent per image, stacked: (images, C, h, w) float32."""
        return np.stack([g.standard_normal(self.shape, dtype=np.float32) for g in self._generators])


def given(explicit: np.ndarray | None, chunk: slice, drawn: np.ndarray) -> np.ndarray:
    """The caller's array for this chunk when given, else the seeded draw (drawn either way, so that
    what follows in each image's stream does not depend on what the caller supplied)."""
    if explicit is None:
        return drawn
    part = np.asarray(explicit, dtype=np.float32)[chunk]
    if part.shape != drawn.shape:
        raise InvalidRequest("noise", f"expected noise of shape {drawn.shape} for this chunk, got {part.shape}")
    return part
