"""ControlNet in the engines: a model exported with `--controlnet` renders without ControlNet exactly as the
plain export of the same weights (its residual inputs fed zeros), batched renders included."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import engines

Model = Callable[[str], Path]


def _request(**overrides: object) -> engines.RenderRequest:
    fields = {"prompt": "a lighthouse at dusk", "negative_prompt": "", "width": 64, "height": 96, "steps": 3,
              "guidance_scale": 5.0, "sampler": "euler", "seed": 7, "n": 2} | overrides
    return engines.RenderRequest(**fields)


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_a_controlnet_export_renders_without_controlnet_as_the_plain_export(
        controlnet_model: Model, tiny_model: Model, name: str) -> None:
    with_inputs = engines.load(controlnet_model(name), backend="cpu")
    plain = engines.load(tiny_model(name), backend="cpu")
    assert with_inputs.manifest.residuals is not None and plain.manifest.residuals is None
    for request in (_request(), _request(width=80, height=64, n=1, sampler="dpmpp_2m")):
        ours, theirs = with_inputs.render(request), plain.render(request)
        np.testing.assert_allclose(ours.pixels, theirs.pixels, atol=1e-5)
