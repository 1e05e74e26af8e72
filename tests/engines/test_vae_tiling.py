"""Tiled VAE decoding: exact blending for a local decoder, no visible seams for the real one."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from engines import images, vae_tiling
from engines import manifest as mf
from engines.backends import ort

Model = Callable[[str], Path]


@pytest.mark.parametrize(("length", "tile", "overlap"), [(40, 16, 4), (16, 16, 4), (17, 16, 4), (128, 64, 16)])
def test_tiles_cover_every_cell_with_the_overlap(length: int, tile: int, overlap: int) -> None:
    offsets = vae_tiling.starts(length, tile, overlap)
    covered = np.zeros(length, int)
    for start in offsets:
        covered[start:start + tile] += 1
    assert (covered >= 1).all() and offsets[-1] + min(tile, length) == length
    assert all(b - a <= tile - overlap for a, b in itertools.pairwise(offsets))


def test_blending_is_exact_for_a_decoder_without_context() -> None:
    """A decoder whose pixels depend only on their own latent cell (nearest upsampling) decodes the same
    in tiles: the weights of overlapping tiles sum to one everywhere."""
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, 4, 40, 56)).astype(np.float32)

    def upsample(z: np.ndarray) -> np.ndarray:
        return z[:, :3].repeat(8, axis=2).repeat(8, axis=3)

    tiled = vae_tiling.decode(upsample, latents, 8, tile=16, overlap=4, threshold=0)
    assert np.abs(tiled - upsample(latents)).max() < 1e-5


def test_tiled_decode_shows_no_seams(tiny_model: Model) -> None:
    """The real decoder normalizes per tile, so tiles differ slightly from the whole. Tolerances: the mean
    pixel difference stays under 0.03 of 0-1 (measured 0.014 with these small 32-cell tiles, 0.008 at
    1024² with the real 64-cell ones: invisible), and the column-to-column steps at the tile overlaps are
    on average within 10 % of the untiled image's, no single column over 50 % (a seam is a jump there;
    measured 0.97 and 1.13)."""
    root = tiny_model("tiny-sd15")
    manifest = mf.read(root)
    session = ort.OrtBackend(root, "cpu", manifest).open("vae_decoder", manifest.components["vae_decoder"])

    def run(z: np.ndarray) -> np.ndarray:
        return session.run({"latent_sample": z}, ["sample"])["sample"]

    rng = np.random.default_rng(0)  # spatially smooth latents, as real ones are
    latents = rng.standard_normal((1, 4, 12, 12)).astype(np.float32).repeat(4, 2).repeat(4, 3)
    latents += 0.3 * rng.standard_normal(latents.shape).astype(np.float32)
    whole = images.to_pixels(run(latents))
    tiled = images.to_pixels(vae_tiling.decode(run, latents, 8, tile=32, overlap=8, threshold=0))
    assert whole.shape == tiled.shape
    assert np.abs(whole - tiled).mean() < 0.03
    steps_tiled = np.abs(np.diff(tiled, axis=2)).mean(axis=(0, 1, 3))  # pixels are (n, h, w, rgb)
    steps_whole = np.abs(np.diff(whole, axis=2)).mean(axis=(0, 1, 3))
    ratio = steps_tiled / steps_whole
    overlaps = [c for start in vae_tiling.starts(48, 32, 8)[1:] for c in range(start * 8, (start + 8) * 8)]
    assert ratio[overlaps].mean() < 1.1 and ratio.max() < 1.5


def test_a_models_native_size_is_decoded_whole(tiny_model: Model) -> None:
    """SDXL's native 1024² (128² latent cells) is above the tiling threshold: the pipeline still decodes its
    native size whole, so it equals diffusers' untiled decode (and fits TensorRT plans' native profile).
    The tiny SDXL model is given SDXL's real native size for this."""
    import msgspec

    import engines

    pipe = engines.load(tiny_model("tiny-sdxl"), backend="cpu")
    pipe.manifest = msgspec.structs.replace(
        pipe.manifest, defaults=msgspec.structs.replace(pipe.manifest.defaults, width=1024, height=1024))
    assert vae_tiling.THRESHOLD < 128 * 128
    latents = np.random.default_rng(1).standard_normal((1, 4, 128, 128)).astype(np.float32)
    session = pipe.sessions["vae_decoder"]
    whole = session.run({"latent_sample": latents / pipe.manifest.vae_scaling_factor}, ["sample"])["sample"]
    assert np.array_equal(pipe.decode_latents(latents), images.to_pixels(whole))
