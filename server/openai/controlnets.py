"""ControlNet units at the OpenAI edge: the `controlnet` field (a list, or its JSON text on multipart routes)
checked against `engines.limits`, each unit's image read (a data URL, plain base64, or an https URL under the
JSON edits' `image_url` rules), decoded, size-checked and fitted to the render size, before anything is
queued; and the model cards' ControlNets (which nodes offer them: `server.adapters`)."""

from __future__ import annotations

import anyio
import msgspec

from engines import limits
from engines.errors import InvalidRequest
from engines.images import fit
from engines.info import ModelInfo
from engines.render import ControlUnit
from server import images
from server.openai.uploads import read_image
from server.protocol import ControlNetCard, ControlNetUnit, ImageRef
from server.settings import Settings
from server.wire import ControlOrder

PARAM = "controlnet"


def units(field: list[ControlNetUnit] | str | None) -> list[ControlNetUnit]:
    """The field's units, checked against the limits (InvalidRequest naming `controlnet`)."""
    if isinstance(field, str):
        try:  # multipart forms carry the list as JSON text
            field = msgspec.json.decode(field, type=list[ControlNetUnit]) if field.strip() else []
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise InvalidRequest(PARAM, "'controlnet' must be a JSON list of {\"model\", \"image\", "
                                        f"\"scale\", \"start\", \"end\", \"preprocess\"}} objects: {exc}") from exc
    chosen = field or []
    limits.check_controlnets([ControlUnit(name=u.model, image=None, scale=u.scale, start=u.start, end=u.end,
                                          preprocess=u.preprocess, low=u.low, high=u.high) for u in chosen])
    return chosen


def check_names(chosen: list[ControlNetUnit], info: ModelInfo) -> None:
    """Each unit names a ControlNet the model offers (on some node), and the model takes ControlNets."""
    if not chosen:
        return
    if not info.controlnet_inputs:
        raise limits.controlnet_unsupported(info.id)
    offered = [c.name for c in info.controlnets]
    for unit in chosen:
        if unit.model not in offered:
            raise limits.controlnet_not_found(info.id, unit.model, offered)


async def orders(chosen: list[ControlNetUnit], settings: Settings, size: tuple[int, int]) -> list[ControlOrder]:
    """Each unit with its image read, decoded and fitted to `size` (PNG), as a node renders it."""
    made = []
    for unit in chosen:
        url = unit.image.strip()
        if not url.lower().startswith(("data:", "http://", "https://")):
            url = f"data:image/png;base64,{url}"  # plain base64
        read = await read_image(ImageRef(image_url=url), PARAM, settings)
        assert read is not None
        png = await anyio.to_thread.run_sync(_fitted, read.data, settings.max_pixels, size)
        made.append(ControlOrder(name=unit.model, image=png, scale=unit.scale, start=unit.start, end=unit.end,
                                 preprocess=unit.preprocess, low=unit.low, high=unit.high))
    return made


def _fitted(data: bytes, max_pixels: int, size: tuple[int, int]) -> bytes:
    return images.png(fit(images.decode(data, PARAM, max_pixels).convert("RGB"), *size))


def cards(info: ModelInfo) -> list[ControlNetCard]:
    return [ControlNetCard(name=c.name, family=c.family) for c in info.controlnets]
