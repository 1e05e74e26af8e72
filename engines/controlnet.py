"""ControlNet in the engines: the control image a ControlNet reads, and the residuals on the UNet's side.

A model exported with `--controlnet` has a UNet that takes one residual per down-block output and the mid
block's as inputs (`manifest.residuals`). A UNet call without ControlNet feeds them zeros, which leaves the
UNet's output as the plain export's.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
from PIL import Image

from engines import images
from engines import manifest as mf
from engines.backends import Session
from engines.canny import canny
from engines.info import ControlNetInfo

Preprocess = Literal["none", "canny"]
PREPROCESSORS: tuple[str, ...] = get_args(Preprocess)
CANNY_THRESHOLDS = (100.0, 200.0)  # sd-webui-controlnet's defaults (low, high)


def control_image(image: Image.Image, width: int, height: int, preprocess: Preprocess = "none",
                  thresholds: tuple[float, float] = CANNY_THRESHOLDS) -> np.ndarray:
    """(1, 3, H, W) float32 in [0, 1], as diffusers' ControlNet pipelines feed `controlnet_cond`: the image
    fitted to the render size as uploads are (center crop, then resize), then with `canny` its edge map
    (white on black, the same in all three channels) at that size."""
    rgb = np.asarray(images.fit(image.convert("RGB"), width, height))
    if preprocess == "canny":
        rgb = np.repeat(canny(rgb, *thresholds)[:, :, None], 3, axis=2)
    return (rgb.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]


class ResidualSession(Session):
    """The UNet of a `--controlnet` export: residuals a call does not feed are zeros of the call's shape."""

    def __init__(self, inner: Session, residuals: mf.Residuals) -> None:
        super().__init__(inner.name, inner.component)
        self.inner, self.max_rows = inner, inner.max_rows
        self.ran_on = inner.ran_on  # the calls run where the inner session runs them
        specs = {t.name: t for t in inner.component.inputs}
        self.shapes = {name: (int(specs[name].shape[1]), _scale(specs[name].shape[2]))
                       for name in (*residuals.down, residuals.mid)}
        self._zeros: tuple[tuple[int, ...], dict[str, np.ndarray]] | None = None

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        missing = [name for name in self.shapes if name not in feeds]
        if missing:
            zeros = self.zeros(feeds["sample"].shape)
            feeds = {**feeds, **{name: zeros[name] for name in missing}}
        return self.inner.run(feeds, outputs)

    def zeros(self, sample: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Zero residuals for a UNet call on `sample`'s shape (the last shape's are kept: steps repeat it)."""
        if self._zeros is None or self._zeros[0] != sample:
            batch, _, height, width = sample
            self._zeros = (sample, {name: np.zeros((batch, channels, -(-height // scale), -(-width // scale)),
                                                   np.float32)
                                    for name, (channels, scale) in self.shapes.items()})
        return self._zeros[1]

    def close(self) -> None:
        self.inner.close()


def infos(manifest: mf.Manifest) -> list[ControlNetInfo]:
    """The ControlNets exported beside this model, by name, as `ModelInfo.controlnets` lists them."""
    return [ControlNetInfo(name=name, family=net.family, source=net.source.id, sha256=net.component.graph.sha256)
            for name, net in manifest.controlnets.items()]


def wrap(sessions: dict[str, Session], manifest: mf.Manifest) -> dict[str, Session]:
    if manifest.residuals is None:
        return sessions
    return {**sessions, "unet": ResidualSession(sessions["unet"], manifest.residuals)}


def _scale(axis: int | str) -> int:
    """The downscale of a residual's height axis as the export names it: "height", "height/2", "height/4"."""
    _, _, divisor = str(axis).partition("/")
    return int(divisor or 1)
