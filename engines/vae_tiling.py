"""Decoding large latents in overlapping tiles, so that the VAE decoder's memory stays that of one tile.

The decoder's activations grow with the image (at 1024² a single 128-channel feature map at full size
is 512 MiB in fp32, and several are alive at once): above `THRESHOLD` the latents are decoded in tiles
of `TILE` latent cells that overlap by `OVERLAP`, and each output pixel is the weighted mean of the
tiles covering it, the weights ramping linearly across the overlap so no edge shows. The tiles are not
exact (the decoder's GroupNorm sees a tile's statistics, not the image's), which is why sizes up to the
threshold and up to the model's native size (SDXL's 1024² is above the threshold) are decoded whole and
match diffusers' untiled decode; the pipeline passes the larger of the two.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

TILE = 64  # latent cells per tile side: 512 px at the usual ×8
OVERLAP = 16  # latent cells two neighbouring tiles share
THRESHOLD = 96 * 96  # latent cells (768² px at ×8) above which the decode is tiled

Decoder = Callable[[np.ndarray], np.ndarray]


def decode(run: Decoder, latents: np.ndarray, scale: int, tile: int = TILE, overlap: int = OVERLAP,
           threshold: int = THRESHOLD) -> np.ndarray:
    """`run(latents)` → pixels (n, c, h·scale, w·scale), in tiles when the latents exceed `threshold`."""
    height, width = latents.shape[2:]
    if height * width <= threshold or (height <= tile and width <= tile):
        return run(latents)
    rows, cols = starts(height, tile, overlap), starts(width, tile, overlap)
    out: np.ndarray | None = None
    total = np.zeros((height * scale, width * scale), np.float32)
    for y in rows:
        for x in cols:
            pixels = run(np.ascontiguousarray(latents[:, :, y:y + tile, x:x + tile]))
            weight = np.outer(_ramp(y, rows, tile, overlap, height, scale), _ramp(x, cols, tile, overlap, width, scale))
            if out is None:
                out = np.zeros((*pixels.shape[:2], *total.shape), np.float32)
            ys, xs = slice(y * scale, y * scale + pixels.shape[2]), slice(x * scale, x * scale + pixels.shape[3])
            out[:, :, ys, xs] += pixels * weight
            total[ys, xs] += weight
    return out / total


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along one axis: a stride of tile - overlap, the last tile ending at the edge."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    offsets = list(range(0, length - tile, stride))
    return [*offsets, length - tile]


def _ramp(start: int, offsets: list[int], tile: int, overlap: int, length: int, scale: int) -> np.ndarray:
    """Per-pixel weights of one tile along one axis: rising over the part shared with the previous tile,
    falling over the part shared with the next, 1 in between (never 0, so every pixel has weight)."""
    size = min(tile, length) * scale
    weight = np.ones(size, np.float32)
    index = offsets.index(start)
    if index > 0:
        shared = (offsets[index - 1] + tile - start) * scale
        weight[:shared] = (np.arange(shared, dtype=np.float32) + 0.5) / shared
    if index + 1 < len(offsets):
        shared = (start + tile - offsets[index + 1]) * scale
        weight[size - shared:] = np.minimum(weight[size - shared:],
                                            (np.arange(shared, 0, -1, dtype=np.float32) - 0.5) / shared)
    return weight
