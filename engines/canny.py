"""The `canny` control-image preprocessor in numpy: OpenCV's `cv2.Canny(image, low, high)` (3×3 Sobel with
replicated borders, L1 gradient magnitude, no blur), which sd-webui-controlnet's `canny` module runs, without
OpenCV at serve time.

    1. gradients  → 3×3 Sobel per channel; each pixel keeps the channel of the largest |dx| + |dy|
    2. thinning   → a pixel over `low` stays a candidate where it is the maximum along its gradient's
                    direction (horizontal, vertical or one diagonal, binned at 22.5° as OpenCV does)
    3. hysteresis → candidates over `high` are edges, and so is every candidate 8-connected to an edge
"""

from __future__ import annotations

import math

import numpy as np

_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)  # tan(22.5°) in OpenCV's fixed point
_NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Edges of an 8-bit image (H×W or H×W×C) as a H×W uint8 map of 0 and 255."""
    pixels = image.astype(np.int32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    dx, dy = _sobel(pixels)
    magnitude = np.abs(dx) + np.abs(dy)
    if magnitude.shape[2] > 1:  # the channel with the largest magnitude (the first of equals)
        pick = magnitude.argmax(axis=2)[:, :, None]
        dx, dy, magnitude = (np.take_along_axis(a, pick, axis=2) for a in (dx, dy, magnitude))
    dx, dy, magnitude = dx[:, :, 0], dy[:, :, 0], magnitude[:, :, 0]
    low, high = sorted((low, high))
    candidates = _thin(magnitude, dx, dy) & (magnitude > math.floor(low))
    edges = _connect(candidates, candidates & (magnitude > math.floor(high)))
    return edges.astype(np.uint8) * 255


def _sobel(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = pixels.shape[:2]

    def at(row: int, col: int) -> np.ndarray:
        return p[1 + row:1 + row + h, 1 + col:1 + col + w]

    dx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    dy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    return dx, dy


def _thin(magnitude: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression with OpenCV's comparisons (strict on one side, not the other, except on
    diagonals) and zero magnitude outside the image."""
    m = np.pad(magnitude, 1)
    h, w = magnitude.shape

    def at(row: int, col: int) -> np.ndarray:
        return m[1 + row:1 + row + h, 1 + col:1 + col + w]

    x = np.abs(dx).astype(np.int64)
    y = np.abs(dy).astype(np.int64) << _SHIFT
    tg22 = x * _TG22
    tg67 = tg22 + (x << (_SHIFT + 1))
    horizontal = y < tg22
    vertical = ~horizontal & (y > tg67)
    diagonal = ~horizontal & ~vertical
    same_sign = (dx ^ dy) >= 0  # the gradient runs down-right (or up-left)
    keep = horizontal & (magnitude > at(0, -1)) & (magnitude >= at(0, 1))
    keep |= vertical & (magnitude > at(-1, 0)) & (magnitude >= at(1, 0))
    keep |= diagonal & same_sign & (magnitude > at(-1, -1)) & (magnitude > at(1, 1))
    keep |= diagonal & ~same_sign & (magnitude > at(-1, 1)) & (magnitude > at(1, -1))
    return keep


def _connect(candidates: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Every candidate reachable from a strong one through 8-connected candidates (a walk over the few edge
    pixels, not over the image)."""
    h, w = candidates.shape
    allowed = np.pad(candidates, 1).ravel()
    edges = np.pad(strong, 1).ravel()
    width = w + 2
    offsets = [dr * width + dc for dr, dc in _NEIGHBOURS]
    stack = np.flatnonzero(edges).tolist()
    while stack:
        here = stack.pop()
        for offset in offsets:
            there = here + offset
            if allowed[there] and not edges[there]:
                edges[there] = True
                stack.append(there)
    return edges.reshape(h + 2, width)[1:-1, 1:-1]
