"""POST /v1/images/generations, /edits, /variations, and GET /v1/images/files/{name}: parse, order, reply
(as JSON, or as OpenAI's event stream for `stream: true`)."""

from __future__ import annotations

import base64
import time
from typing import Annotated

import anyio
import msgspec
from litestar import Request, Response, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body
from litestar.response import File, Stream

from engines import limits
from engines.info import ModelInfo
from server import sse
from server.errors import IMAGE_ERRORS, ApiError, documented
from server.guards import edit_body, for_tenant, json_body, multipart_body, rate_limit
from server.logs import user_hash
from server.openai import controlnets, forms
from server.openai import requests as orders
from server.openai.store import ImageStore
from server.openai.uploads import Upload, read_image, upload
from server.protocol import (
    ImageData,
    ImageEditJsonRequest,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationRequest,
    Usage,
)
from server.state import AppState
from server.wire import ControlOrder, RenderedImages, RenderOrder

Multipart = Body(media_type=RequestEncodingType.MULTI_PART)
# A JSON body is prompts and numbers: two 4000-character prompts, every character escaped, take ~100 KB.
JSON_BODY_LIMIT = 1024 * 1024


@post("/images/generations", status_code=200, guards=[json_body, rate_limit], responses=documented(*IMAGE_ERRORS),
      request_max_body_size=JSON_BODY_LIMIT,
      summary="Create images from a prompt")
async def generations(data: ImageGenerationRequest, request: Request) -> Response[ImagesResponse]:
    # Litestar converts JSON leniently ("2" would pass as n=2); OpenAI's API and ours take JSON types
    # as they are, so the cached body is decoded again strictly. `data` keeps the OpenAPI schema.
    data = msgspec.json.decode(await request.body(), type=ImageGenerationRequest)
    state = AppState.of(request)
    request.state.user = user_hash(data.user)
    prompt = orders.resolve_prompt(data.prompt)
    info = state.resolve_model(data.model, request)
    guides = await _controlnets(data, info, state, orders.resolve_size(data.size, info))
    order = orders.build(data, info, state.request_id(request), prompt, strength=1.0, controlnet=guides)
    return await _render_and_reply(state, request, order, data.response_format)


async def _controlnets(data: ImageGenerationRequest | ImageEditRequest | ImageEditJsonRequest | ImageVariationRequest,
                       info: ModelInfo, state: AppState, size: tuple[int, int]) -> list[ControlOrder]:
    """The request's ControlNet units checked (bounds, then names: before any image is read), then their images."""
    chosen = controlnets.units(data.controlnet)
    if not chosen:
        return []
    controlnets.check_names(chosen, info)
    with state.admission(info.id):
        return await controlnets.orders(chosen, state.settings, size)


async def _json_edits(request: Request) -> Response[ImagesResponse] | None:
    """`application/json` edits, answered before Litestar reads the body as the multipart form below
    (which `forms.parse` reads leniently)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        await forms.parse(request)
        return None
    state = AppState.of(request)
    data = msgspec.json.decode(await request.body(), type=ImageEditJsonRequest)
    if not data.images:
        raise ApiError(400, "missing required parameter 'images' (a list of {image_url})", param="images",
                       code="missing_required_parameter")
    image = await read_image(data.images[0], "images", state.settings)
    assert image is not None
    return await _edit(request, state, data, image, await read_image(data.mask, "mask", state.settings))


@post("/images/edits", status_code=200, guards=[edit_body, rate_limit], before_request=_json_edits,
      responses=documented(*IMAGE_ERRORS),
      summary="Edit an image: inpaint where the mask (or the image's alpha) is transparent, else image to image",
      description="multipart/form-data as below, or application/json with `images: [{image_url}]` and `mask: "
      "{image_url}` (data: URLs; http(s) where the server fetches them) and the same other fields")
async def edits(data: Annotated[ImageEditRequest, Multipart], request: Request) -> Response[ImagesResponse]:
    state = AppState.of(request)
    limit = state.settings.max_upload_bytes
    image = await upload(data.image if data.image is not None else data.image_list, "image", limit)
    mask = await upload(data.mask, "mask", limit) if data.mask is not None else None
    return await _edit(request, state, data, image, mask)


async def _edit(request: Request, state: AppState, data: ImageEditRequest | ImageEditJsonRequest, image: Upload,
                mask: Upload | None) -> Response[ImagesResponse]:
    request.state.user = user_hash(data.user)
    prompt = orders.resolve_prompt(data.prompt)
    info = state.resolve_model(data.model, request)
    size = orders.resolve_size(data.size, info)
    guides = await _controlnets(data, info, state, size)
    with state.admission(info.id):
        image_png, mask_png = await anyio.to_thread.run_sync(orders.edit_inputs, image, mask, state.settings, size)
    strength = data.strength if data.strength is not None else limits.default_strength(mask_png is not None)
    order = orders.build(data, info, state.request_id(request), prompt, strength, image_png, mask_png, guides)
    return await _render_and_reply(state, request, order, data.response_format)


@post("/images/variations", status_code=200, guards=[multipart_body, rate_limit], responses=documented(*IMAGE_ERRORS),
      before_request=forms.parse,
      summary="Variations of an image (image to image with an empty prompt)")
async def variations(data: Annotated[ImageVariationRequest, Multipart], request: Request) -> Response[ImagesResponse]:
    state = AppState.of(request)
    request.state.user = user_hash(data.user)
    info = state.resolve_model(data.model, request)
    size = orders.resolve_size(data.size, info)
    image = await upload(data.image, "image", state.settings.max_upload_bytes)
    guides = await _controlnets(data, info, state, size)
    with state.admission(info.id):
        image_png = await anyio.to_thread.run_sync(orders.variation_input, image, state.settings, size)
    strength = limits.default_strength(False, variation=True) if data.strength is None else data.strength
    order = orders.build(data, info, state.request_id(request), "", strength, image_png, controlnet=guides)
    return await _render_and_reply(state, request, order, data.response_format)


async def _render_and_reply(state: AppState, request: Request, order: RenderOrder,
                            response_format: str | None) -> Response[ImagesResponse] | Stream:
    request.state.model = order.model
    order = for_tenant(request, order)
    if order.events is not None:  # stream: true; errors before a node accepted it are ordinary HTTP errors
        frames = await state.while_connected(request, order, state.renderer.open_stream(order))
        return Stream(frames, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
    rendered = await state.render_while_connected(request, order)
    data = []
    for image, seed in zip(rendered.images, rendered.seeds, strict=True):
        if response_format == "b64_json":
            data.append(ImageData(seed=seed, b64_json=base64.b64encode(image).decode("ascii")))
        else:
            name = await anyio.to_thread.run_sync(store_of(request).put, image, order.output_format)
            data.append(ImageData(seed=seed, url=f"{state.base_url(request)}/v1/images/files/{name}"))
    body = ImagesResponse(created=int(time.time()), data=data, model=order.model, size=f"{order.width}x{order.height}",
                          output_format=order.output_format, quality=order.quality,
                          usage=Usage.of_text(rendered.input_tokens))
    return Response(body, headers={"server-timing": _server_timing(rendered)})


def _server_timing(rendered: RenderedImages) -> str:
    return ", ".join(f"{stage};dur={seconds * 1000:.1f}" for stage, seconds in rendered.timings.items())


@get("/images/files/{name:str}", responses=documented(404),
     summary="Download a generated image (expires after the image TTL)")
async def image_file(name: str, request: Request) -> File:
    """Not behind the API key: the name is a 192-bit capability, like OpenAI's pre-signed URLs, so that stock
    clients can download the URLs they are given."""
    found = store_of(request).get(name)
    if found is None:
        raise ApiError(404, "no such image, or it has expired", param="name", code="image_not_found")
    path, content_type = found
    return File(path=path, media_type=content_type, content_disposition_type="inline", filename=name)


def store_of(request: Request) -> ImageStore:
    return request.app.state.store
