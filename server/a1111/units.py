"""sd-webui-controlnet's units (`alwayson_scripts.controlnet.args` on txt2img and img2img) → the ControlNet units
the OpenAI routes' `controlnet` field makes: bounds checked by `engines.limits`, names by the model's card, each
unit's image decoded and fitted to the render size before anything is queued.

A unit's fields, as the extension names them:
    enabled                 false: the unit is skipped
    image / input_image     the control image: base64, with or without a data-URL prefix, or {"image", "mask"}
                            (the image is taken); none on img2img: the init image, as img2img fitted it
    module                  none | canny (any case); anything else is a 422
    model                   `name` or `name [hash]` (`/controlnet/model_list`)
    weight                  the scale, 0 to 2
    guidance_start/_end     the window, fractions of the schedule
    threshold_a/_b          canny's low and high thresholds; -1 or outside the slider takes its default
    resize_mode             0 "Just Resize" stretches; 1 "Crop and Resize" center-crops to the aspect (the OpenAI
                            route's fit); 2 "Resize and Fill" fits inside and fills with the border's median colour
    control_mode            0 "Balanced" only; the prompt-weighted modes are a 422
    processor_res, pixel_perfect   accepted, no effect: canny runs on the control image at the render size, which
                            is what pixel_perfect asks for
    low_vram, hr_option     accepted, no effect (there is no hires fix here)
A unit `mask` (the extension's inpaint mask for the control) is a 422; other fields are not read.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import numpy as np
from PIL import Image

from engines import limits
from engines.errors import InvalidRequest
from engines.images import fit
from engines.info import ModelInfo
from engines.render import ControlUnit
from server import images
from server.a1111 import requests as orders
from server.a1111.controlnet import MODULES, slider
from server.settings import Settings
from server.wire import ControlOrder

RESIZE_MODES = {"just resize": 0, "crop and resize": 1, "resize and fill": 2}
# the engines' names of a unit's fields → the extension's, for the messages and `loc` of limits' refusals
FIELDS = {"model": "model", "scale": "weight", "start": "guidance_start", "end": "guidance_end",
          "preprocess": "module", "low": "threshold_a", "high": "threshold_b"}


class Unit(msgspec.Struct, kw_only=True):
    """The fields of a unit read here (see the module doc); others are not."""

    enabled: bool = True
    image: str | dict[str, Any] | None = None
    input_image: str | dict[str, Any] | None = None
    mask: str | None = None
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    threshold_a: float = -1
    threshold_b: float = -1
    resize_mode: int | str = 1
    control_mode: int | str = 0
    processor_res: float = -1
    pixel_perfect: bool = False
    low_vram: bool = False
    hr_option: str | int = "Both"


def read(scripts: dict[str, Any]) -> tuple[str, list[tuple[int, Unit]]]:
    """Where the units are (`alwayson_scripts.ControlNet.args`, as the request spells it), and the enabled ones
    with their index there (the script's shape was checked by `requests.check_scripts`)."""
    name, script = next(((n, s) for n, s in scripts.items() if n.lower() == "controlnet"), ("controlnet", None))
    units = (script.get("args", []) if isinstance(script, dict) else script) or []
    args = f"alwayson_scripts.{name}.args"
    enabled = []
    for i, raw in enumerate(units):
        try:
            unit = msgspec.convert(raw, Unit, strict=False)
        except msgspec.ValidationError as exc:
            text, path = str(exc), re.search(r"\$\.(\w+)", str(exc))
            raise orders.invalid(f"{args}.{i}" + (f".{path.group(1)}" if path else ""), text) from None
        if unit.enabled:
            enabled.append((i, unit))
    return args, enabled


def orders_for(scripts: dict[str, Any], info: ModelInfo, settings: Settings, size: tuple[int, int],
               init: bytes | None = None) -> list[ControlOrder]:
    """The ControlOrders of the enabled units: all checked before any image is read."""
    args, chosen = read(scripts)
    engine_units = [_checked(f"{args}.{i}", unit) for i, unit in chosen]
    _check(args, engine_units, [i for i, _ in chosen], info)
    made = []
    for (i, unit), engine in zip(chosen, engine_units, strict=True):
        png = _control_image(f"{args}.{i}", unit, settings, size, init)
        made.append(ControlOrder(name=engine.name, image=png, scale=engine.scale, start=engine.start,
                                 end=engine.end, preprocess=engine.preprocess, low=engine.low, high=engine.high))
    return made


def _checked(at: str, unit: Unit) -> ControlUnit:
    """One unit's own fields in the engines' terms; what limits checks is left to it."""
    module = unit.module.strip().lower()
    if module not in MODULES:
        raise orders.invalid(f"{at}.module", f"module '{unit.module}' is not available here; choose one "
                             f"of {', '.join(MODULES)}")
    if unit.control_mode not in (0, "Balanced"):
        raise orders.invalid(f"{at}.control_mode", f"control_mode '{unit.control_mode}' is not available "
                             "here; only 0 (\"Balanced\")")
    _resize_mode(at, unit)
    if unit.mask:
        raise orders.invalid(f"{at}.mask", "a ControlNet unit's mask is not applied here; send none")
    low_slider, high_slider = MODULES["canny"][1:]
    return ControlUnit(name=unit.model.split(" [", 1)[0].strip(), image=None, scale=unit.weight,
                       start=unit.guidance_start, end=unit.guidance_end, preprocess=module,
                       low=slider(unit.threshold_a, low_slider), high=slider(unit.threshold_b, high_slider))


def _check(args: str, units: list[ControlUnit], indexes: list[int], info: ModelInfo) -> None:
    """limits' bounds, then the model's names; refusals renamed to the unit's fields (`args.1.weight`)."""
    try:
        limits.check_controlnets(units, args)
    except InvalidRequest as exc:
        found = re.search(r"\[(\d+)\](?:\.(\w+))?", exc.message)
        if not found:  # too many units
            raise orders.invalid(args, exc.message.replace(" units;", " enabled units;")) from None
        at, field = indexes[int(found.group(1))], FIELDS.get(found.group(2) or "start", "guidance_start")
        message = exc.message.replace(found.group(0), f"[{at}].{field}")
        raise orders.invalid(f"{args}.{at}.{field}", message) from None
    offered = [net.name for net in info.controlnets]
    for i, unit in zip(indexes, units, strict=True):
        if not info.controlnet_inputs:
            raise orders.invalid(f"{args}.{i}.model", limits.controlnet_unsupported(info.id).message)
        if unit.name not in offered:
            raise orders.invalid(f"{args}.{i}.model", limits.controlnet_not_found(info.id, unit.name,
                                                                                  offered).message)


def _resize_mode(at: str, unit: Unit) -> int:
    mode = RESIZE_MODES.get(unit.resize_mode.strip().lower()) if isinstance(unit.resize_mode, str) \
        else unit.resize_mode
    if mode not in (0, 1, 2):
        raise orders.invalid(f"{at}.resize_mode", f"resize_mode '{unit.resize_mode}' is not one of 0 \"Just "
                             "Resize\", 1 \"Crop and Resize\", 2 \"Resize and Fill\"")
    return mode


def _control_image(at: str, unit: Unit, settings: Settings, size: tuple[int, int], init: bytes | None) -> bytes:
    source, param = (unit.image, "image") if unit.image else (unit.input_image, "input_image")
    if isinstance(source, dict):
        source, param = source.get("image"), f"{param}.image"
    if not source:
        if init is None:
            raise orders.invalid(f"{at}.image", "an enabled ControlNet unit needs an image on txt2img")
        return init  # already fitted to the render size
    if not isinstance(source, str):
        raise orders.invalid(f"{at}.{param}", "the image must be base64 text")
    picture = orders.decode_image(source.strip(), f"{at}.{param}", settings).convert("RGB")
    mode = _resize_mode(at, unit)
    if mode == 0:
        return images.png(orders.resize(picture, size, 0))
    return images.png(fit(picture, *size) if mode == 1 else _filled(picture, size))


def _filled(picture: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The extension's "Resize and Fill": the whole image inside `size`, the rest its border's median colour."""
    pixels = np.asarray(picture)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    scale = min(size[0] / picture.width, size[1] / picture.height)
    inner = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    canvas = Image.new("RGB", size, tuple(int(v) for v in np.median(border, axis=0)))
    canvas.paste(orders.resize(picture, inner, 0), ((size[0] - inner[0]) // 2, (size[1] - inner[1]) // 2))
    return canvas

