"""ControlNet in the engines: the units a render asks for, the ControlNets a model offers, and the residuals
they add to each UNet call.

A model exported with `--controlnet` has a UNet that takes one residual per down-block output and the mid
block's as inputs (`manifest.residuals`). A UNet call without ControlNet feeds them zeros, which leaves the
UNet's output as the plain export's. At each step, every unit active at that step (diffusers'
`control_guidance_start/end`) runs its ControlNet on the UNet's own latent input, timestep and text (SDXL:
and added) conditioning, both guidance halves, with its control image; its residuals times its scale are
added up over units (MultiControlNet) and fed to the UNet. Renders that share a UNet call each run their
own ControlNets; rows of renders without any get zeros.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engines import images, limits
from engines import manifest as mf
from engines.backends import Backend, Session
from engines.canny import canny
from engines.errors import InvalidRequest
from engines.info import ControlNetInfo, ModelInfo
from engines.render import ControlUnit, RenderRequest

log = logging.getLogger("sdserve.engines")

Feeds = dict[str, np.ndarray]


def control_image(image: Image.Image, width: int, height: int, preprocess: str = "none",
                  thresholds: tuple[float, float] = limits.CANNY_THRESHOLDS) -> np.ndarray:
    """(1, 3, H, W) float32 in [0, 1], as diffusers' ControlNet pipelines feed `controlnet_cond`: the image
    fitted to the render size as uploads are (center crop, then resize), then with `canny` its edge map
    (white on black, the same in all three channels) at that size."""
    rgb = np.asarray(images.fit(image.convert("RGB"), width, height))
    if preprocess == "canny":
        rgb = np.repeat(canny(rgb, *thresholds)[:, :, None], 3, axis=2)
    return (rgb.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]


@dataclass(frozen=True)
class Control:
    """A unit checked against the model: its ControlNet, its control image at the render size, its weight."""

    name: str
    image: np.ndarray  # (1, 3, H, W) in [0, 1]
    scale: float
    start: float
    end: float

    def active(self, step: int, steps: int) -> bool:
        """diffusers' `controlnet_keep`: 1 - (i/n < start or (i+1)/n > end)."""
        return not (step / steps < self.start or (step + 1) / steps > self.end)


def check_units(request: RenderRequest, info: ModelInfo) -> tuple[Control, ...]:
    """A request's units (size already resolved) against the model: its UNet takes residuals, each unit is
    within `limits`, names a ControlNet the model offers, and brings a control image that decodes."""
    units = request.controlnet
    if not units:
        return ()
    if not info.controlnet_inputs:
        raise limits.controlnet_unsupported(info.id)
    limits.check_controlnets(units)
    offered = [c.name for c in info.controlnets]
    controls = []
    for i, unit in enumerate(units):
        if unit.name in info.refused_controlnets:
            raise InvalidRequest("controlnet", info.refused_controlnets[unit.name], code="controlnet_incompatible")
        if unit.name not in offered:
            raise limits.controlnet_not_found(info.id, unit.name, offered)
        image = _unit_image(unit, i, request.width, request.height)
        controls.append(Control(unit.name, image, float(unit.scale), float(unit.start), float(unit.end)))
    return tuple(controls)


def _unit_image(unit: ControlUnit, i: int, width: int, height: int) -> np.ndarray:
    field = f"controlnet[{i}].image"
    if not hasattr(unit.image, "size") or not hasattr(unit.image, "convert"):
        raise InvalidRequest("controlnet", f"{field} must be a PIL image")
    return images.decoded("controlnet", lambda: control_image(unit.image, width, height, unit.preprocess,
                                                              (float(unit.low), float(unit.high))), field)


def info(name: str, entry: mf.ControlNet) -> ControlNetInfo:
    return ControlNetInfo(name=name, family=entry.family, source=entry.source.id,
                          sha256=entry.component.graph.sha256)


class ControlNets:
    """The ControlNets one model offers (`manifest.controlnets`, opened on the model's backend), and the
    residuals a render's units add to a UNet call. One that cannot be opened costs itself (`refused`)."""

    def __init__(self, root: Path, manifest: mf.Manifest, backend: Backend, verify: bool = True) -> None:
        self.model, self.latent_channels = root.name, manifest.latent_channels
        residuals = manifest.residuals
        self.outputs = [*residuals.down, residuals.mid] if residuals is not None else []
        self.sessions: dict[str, Session] = {}
        self.refused: dict[str, str] = {}
        self.infos = []
        for name, entry in manifest.controlnets.items():
            try:
                self.sessions[name] = self._open(root, name, entry, backend, verify)
                self.infos.append(info(name, entry))
            except Exception as exc:  # a broken ControlNet costs itself, never the model
                self.refused[name] = f"ControlNet '{name}' of model '{self.model}' cannot be used: {exc}"
                log.warning("%s", self.refused[name])

    def _open(self, root: Path, name: str, entry: mf.ControlNet, backend: Backend, verify: bool) -> Session:
        missing = sorted(set(self.outputs) - {t.name for t in entry.component.outputs})
        if not self.outputs or missing:
            raise InvalidRequest("controlnet", f"its graph lacks the UNet's residual inputs {missing or 'all'}")
        if verify:
            mf.check_refs(root, entry.files())
        return backend.open(f"controlnet-{name}", entry.component)

    def guide(self, renders: Sequence[tuple[Sequence[Control], tuple[int, int]]], inputs: list[Feeds]) -> list[Feeds]:
        """The UNet inputs of renders sharing one call ((units, (step, steps)) each, in order), with each render's
        residuals from its own ControlNet calls, zeros for the rows of renders without an active unit; as they
        are where none has one (the UNet's `ResidualSession` feeds zeros then)."""
        added = [self.residuals(controls, feeds, *at) for (controls, at), feeds in zip(renders, inputs, strict=True)]
        some = next((r for r in added if r is not None), None)
        if some is None:
            return inputs
        return [{**feeds, **(r if r is not None else _zeros_like(some, feeds["sample"].shape[0]))}
                for feeds, r in zip(inputs, added, strict=True)]

    def residuals(self, controls: Sequence[Control], feeds: Feeds, step: int, steps: int) -> Feeds | None:
        """Σ scale · ControlNet(UNet input, timestep, conditioning, control image) over the units active at this
        step (None where none is), in the units' order as diffusers' MultiControlNet adds them."""
        total: Feeds | None = None
        for control in controls:
            if not control.active(step, steps):
                continue
            out = self.sessions[control.name].run(self._feeds(control, feeds), self.outputs)
            scaled = {name: out[name] * np.float32(control.scale) for name in self.outputs}
            total = scaled if total is None else {name: total[name] + scaled[name] for name in self.outputs}
        return total

    def _feeds(self, control: Control, feeds: Feeds) -> Feeds:
        """A ControlNet's inputs from the UNet's: the latents without the inpainting channels, one timestep
        per row, the same text (and SDXL's added) conditioning, the control image on every row."""
        rows = feeds["sample"].shape[0]
        return {**feeds, "sample": feeds["sample"][:, :self.latent_channels],
                "timestep": np.broadcast_to(np.asarray(feeds["timestep"], np.float32), (rows,)),
                "controlnet_cond": np.repeat(control.image, rows, axis=0)}

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()


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


def wrap(sessions: dict[str, Session], manifest: mf.Manifest) -> dict[str, Session]:
    if manifest.residuals is None:
        return sessions
    return {**sessions, "unet": ResidualSession(sessions["unet"], manifest.residuals)}


def _zeros_like(residuals: Feeds, rows: int) -> Feeds:
    return {name: np.zeros((rows, *value.shape[1:]), np.float32) for name, value in residuals.items()}


def _scale(axis: int | str) -> int:
    """The downscale of a residual's height axis as the export names it: "height", "height/2", "height/4"."""
    _, _, divisor = str(axis).partition("/")
    return int(divisor or 1)
