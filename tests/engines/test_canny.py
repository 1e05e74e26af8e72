"""The `canny` preprocessor equals OpenCV's `cv2.Canny` (what sd-webui-controlnet's `canny` module runs) pixel
for pixel, on drawn scenes, noise, blurred edges, grey and colour images, and thresholds given either way round."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engines.canny import canny

cv2 = pytest.importorskip("cv2")  # the test extra installs opencv-python-headless; serving never imports it


def _scene(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(5, width // 2)), y0 + int(rng.integers(5, height // 2))]
        shape = (draw.ellipse, draw.rectangle, draw.line)[int(rng.integers(0, 3))]
        shape(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return np.asarray(image)


_NOISE = np.random.default_rng(0)
CASES = [
    (_scene(96, 128, 0), 100, 200),  # sd-webui-controlnet's defaults
    (_scene(96, 128, 1), 50, 120),
    (_scene(96, 128, 2), 10, 30),
    (_scene(96, 128, 3), 200.7, 100.2),  # swapped and fractional: OpenCV floors and orders them
    (cv2.GaussianBlur(_scene(64, 64, 4), (5, 5), 1.5), 20, 60),  # soft edges: thinning and hysteresis decide
    (_NOISE.integers(0, 256, (40, 50, 3), dtype=np.uint8), 100, 200),
    (_NOISE.integers(0, 256, (33, 47), dtype=np.uint8), 300, 600),  # grey
]


@pytest.mark.parametrize(("image", "low", "high"), CASES)
def test_canny_equals_opencv(image: np.ndarray, low: float, high: float) -> None:
    expected = cv2.Canny(image, low, high)
    got = canny(image, low, high)
    assert got.dtype == np.uint8 and got.shape == image.shape[:2]
    assert (expected > 0).sum() > 100  # the case has edges to get right
    np.testing.assert_array_equal(got, expected)


def test_control_image_is_fitted_then_preprocessed() -> None:
    """`none` feeds the fitted pixels in 0..1; `canny` the fitted image's edges in all three channels."""
    from PIL import Image, ImageOps

    from engines.controlnet import control_image

    source = Image.fromarray(_scene(120, 200, 6))
    fitted = np.asarray(ImageOps.fit(source, (96, 64), method=Image.Resampling.LANCZOS))
    plain = control_image(source, 96, 64)
    assert plain.shape == (1, 3, 64, 96) and plain.dtype == np.float32
    np.testing.assert_allclose(plain[0].transpose(1, 2, 0), fitted / 255.0, atol=1e-7)
    edges = control_image(source, 96, 64, "canny", (50, 120))
    expected = cv2.Canny(fitted, 50, 120) / 255.0
    for channel in edges[0]:
        np.testing.assert_array_equal(channel, expected)
