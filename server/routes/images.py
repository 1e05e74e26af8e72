"""POST /v1/images/generations, /edits, /variations."""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any

import anyio
import msgspec
from litestar import Request, Response, post
from litestar.datastructures import UploadFile
from litestar.enums import RequestEncodingType
from litestar.params import Body

from server import forms, jobs, streaming
from server.access import user_hash
from server.errors import IMAGE_ERRORS, ApiError, documented
from server.protocol import (
    ImageData,
    ImageEditJsonRequest,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationRequest,
    RenderedImages,
    RenderJob,
    Usage,
)
from server.routes import edit_json
from server.routes.guards import edit_body, json_body, multipart_body
from server.state import AppState

Multipart = Body(media_type=RequestEncodingType.MULTI_PART)
# A JSON body is prompts and numbers: two 4000-character prompts, every character escaped, take ~100 KB.
JSON_BODY_LIMIT = 1024 * 1024


@post("/images/generations", status_code=200, guards=[json_body], responses=documented(*IMAGE_ERRORS),
      request_max_body_size=JSON_BODY_LIMIT,
      summary="Create images from a prompt")
async def generations(data: ImageGenerationRequest, request: Request) -> Response[ImagesResponse]:
    # Litestar converts JSON leniently ("2" would pass as n=2); OpenAI's API and ours take JSON types
    # as they are, so the cached body is decoded again strictly. `data` keeps the OpenAPI schema.
    data = msgspec.json.decode(await request.body(), type=ImageGenerationRequest)
    state = AppState.of(request)
    request.state.user = user_hash(data.user)
    prompt = jobs.resolve_prompt(data.prompt)
    info = state.resolve_model(data.model, request)
    job = jobs.build(data, info, state.request_id(request), prompt, strength=1.0)
    return await _render_and_reply(state, request, job, data.response_format)


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
    image = await edit_json.read_image(data.images[0], "images", state.settings)
    assert image is not None
    return await _edit(request, state, data, image, await edit_json.read_image(data.mask, "mask", state.settings))


@post("/images/edits", status_code=200, guards=[edit_body], before_request=_json_edits,
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


async def _edit(request: Request, state: AppState, data: ImageEditRequest | ImageEditJsonRequest, image: jobs.Upload,
                mask: jobs.Upload | None) -> Response[ImagesResponse]:
    request.state.user = user_hash(data.user)
    prompt = jobs.resolve_prompt(data.prompt)
    info = state.resolve_model(data.model, request)
    size = jobs.resolve_size(data.size, info)
    with state.admission(info.id):
        image_png, mask_png = await anyio.to_thread.run_sync(jobs.edit_inputs, image, mask, state.settings, size)
    strength = data.strength if data.strength is not None else (1.0 if mask_png else 0.75)
    job = jobs.build(data, info, state.request_id(request), prompt, strength, image_png, mask_png)
    return await _render_and_reply(state, request, job, data.response_format)


@post("/images/variations", status_code=200, guards=[multipart_body], responses=documented(*IMAGE_ERRORS),
      before_request=forms.parse,
      summary="Variations of an image (image to image with an empty prompt)")
async def variations(data: Annotated[ImageVariationRequest, Multipart], request: Request) -> Response[ImagesResponse]:
    state = AppState.of(request)
    request.state.user = user_hash(data.user)
    info = state.resolve_model(data.model, request)
    size = jobs.resolve_size(data.size, info)
    image = await upload(data.image, "image", state.settings.max_upload_bytes)
    with state.admission(info.id):
        image_png = await anyio.to_thread.run_sync(jobs.variation_input, image, state.settings, size)
    strength = 0.6 if data.strength is None else data.strength
    job = jobs.build(data, info, state.request_id(request), "", strength, image_png)
    return await _render_and_reply(state, request, job, data.response_format)


async def upload(part: Any, param: str, limit: int) -> jobs.Upload:
    """A multipart file part (or the first of several), read and size-checked."""
    if isinstance(part, list):
        part = part[0] if part else None
    if part is None:
        raise ApiError(400, f"missing required parameter '{param}' (a file)", param=param,
                       code="missing_required_parameter")
    if not isinstance(part, UploadFile):
        raise ApiError(400, f"'{param}' must be a file upload, not a form field", param=param, code=f"invalid_{param}")
    data = await part.read(limit + 1)  # enough to know it is too large
    if len(data) > limit:
        raise ApiError(413, f"'{param}' is over the limit of {limit} bytes", param=param, code="file_too_large")
    return jobs.Upload(data, param)


async def _render_and_reply(state: AppState, request: Request, job: RenderJob,
                            response_format: str | None) -> Response[ImagesResponse]:
    if job.events is not None:  # stream: true
        return await streaming.respond(state, request, job)
    request.state.model = job.model
    rendered = await state.render_while_connected(request, job)
    data = []
    for image, seed in zip(rendered.images, rendered.seeds, strict=True):
        if response_format == "b64_json":
            data.append(ImageData(seed=seed, b64_json=base64.b64encode(image).decode("ascii")))
        else:
            name = await anyio.to_thread.run_sync(state.store.put, image, job.output_format)
            data.append(ImageData(seed=seed, url=f"{state.base_url(request)}/v1/images/files/{name}"))
    body = ImagesResponse(created=int(time.time()), data=data, model=job.model, size=f"{job.width}x{job.height}",
                          output_format=job.output_format, quality=job.quality,
                          usage=Usage.of_text(rendered.input_tokens))
    return Response(body, headers={"server-timing": _server_timing(rendered)})


def _server_timing(rendered: RenderedImages) -> str:
    return ", ".join(f"{stage};dur={seconds * 1000:.1f}" for stage, seconds in rendered.timings.items())
