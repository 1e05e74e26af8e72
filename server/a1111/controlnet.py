"""sd-webui-controlnet's routes (`/controlnet`), which scripts call beside A1111's API (the `webuiapi` package's
`controlnet_*` methods): its API version, the ControlNets, the preprocessors ("modules") and `detect`, which
runs a preprocessor on images.

ControlNets are named as the extension names its model files, `name [hash]`: here the name under which
`python -m export controlnet` recorded it in a model's `model.json`, and the first 8 hex digits of its
graph's sha256. The modules are `none` (the image is the map) and `canny`, with the extension's sliders:
the processor resolution (the image's short side before edge detection) and the two thresholds; -1, or a
value outside a slider, takes its default, as the extension does.
"""

from __future__ import annotations

import base64
import math

import anyio
import numpy as np
from litestar import Request, get, post
from PIL import Image

from engines.canny import canny
from engines.info import ControlNetInfo
from server import images
from server.a1111 import requests as orders
from server.a1111.protocol import (
    DetectRequest,
    DetectResponse,
    ModelList,
    ModuleDetail,
    ModuleList,
    Slider,
    VersionResponse,
)
from server.settings import Settings
from server.state import AppState

API_VERSION = 3  # the extension's `external_code.get_api_version()` whose routes and fields these are
RESOLUTION = Slider(name="Resolution", value=512, min=64, max=2048, step=8)
MODULES: dict[str, list[Slider]] = {
    "none": [RESOLUTION],
    "canny": [RESOLUTION, Slider(name="Low Threshold", value=100, min=1, max=255, step=1),
              Slider(name="High Threshold", value=200, min=1, max=255, step=1)],
}


def title(net: ControlNetInfo) -> str:
    return f"{net.name} [{net.sha256[:8]}]"


@get("/version", summary="sd-webui-controlnet's API version these routes answer as")
async def version() -> VersionResponse:
    return VersionResponse(version=API_VERSION)


@get("/model_list", summary="The ControlNets of the models that can render now, as `name [hash]`")
async def model_list(request: Request) -> ModelList:
    ready = AppState.of(request).renderer.ready_models().values()
    return ModelList(model_list=sorted({title(net) for info in ready for net in info.controlnets}))


@get("/module_list", summary="The preprocessors: none and canny, with their sliders")
async def module_list() -> ModuleList:
    detail = {name: ModuleDetail(model_free=False, sliders=sliders) for name, sliders in MODULES.items()}
    return ModuleList(module_list=list(MODULES), module_detail=detail)


@post("/detect", status_code=200, summary="Run a preprocessor on images; base64 PNG maps back")
async def detect(request: Request) -> DetectResponse:
    body = orders.decode_body(await request.body(), DetectRequest)
    if body.controlnet_module not in MODULES:
        raise orders.invalid("controlnet_module", f"module '{body.controlnet_module}' is not available here; "
                             f"choose one of {', '.join(MODULES)}")
    sources = body.controlnet_input_images or body.controlnet_images
    if not sources:
        raise orders.invalid("controlnet_input_images", "No image selected: controlnet_input_images is empty")
    settings = AppState.of(request).settings
    maps = [await anyio.to_thread.run_sync(_detect, body, source, settings) for source in sources]
    return DetectResponse(info="Success", images=[base64.b64encode(m).decode("ascii") for m in maps])


CONTROLNET_ROUTES = [version, model_list, module_list, detect]


def _detect(body: DetectRequest, source: str, settings: Settings) -> bytes:
    """One image through the module, as the extension runs it: canny resizes the short side to the processor
    resolution (bicubic up, area down), pads to multiples of 64 by repeating the edge, finds the edges and
    drops the padding."""
    param = "controlnet_input_images" if body.controlnet_input_images else "controlnet_images"
    image = orders.decode_image(source, param, settings).convert("RGB")
    if body.controlnet_module == "none":
        return images.png(image)
    resolution, low, high = (slider(value, bounds) for value, bounds in zip(
        (body.controlnet_processor_res, body.controlnet_threshold_a, body.controlnet_threshold_b),
        MODULES["canny"], strict=True))
    scale = resolution / min(image.size)
    width, height = round(image.width * scale), round(image.height * scale)
    if width * height > settings.max_pixels:
        raise orders.invalid("controlnet_processor_res", f"a processor resolution of {resolution:g} makes this "
                             f"image {width}x{height}: over the limit of {settings.max_pixels} pixels")
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.BOX)
    padded = np.pad(np.asarray(image), ((0, _pad64(height)), (0, _pad64(width)), (0, 0)), mode="edge")
    edges = canny(padded, int(low), int(high))[:height, :width]
    return images.png(Image.fromarray(edges).convert("RGB"))


def slider(value: float, bounds: Slider) -> float:
    return value if bounds.min <= value <= bounds.max else bounds.value


def _pad64(size: int) -> int:
    return math.ceil(size / 64) * 64 - size
