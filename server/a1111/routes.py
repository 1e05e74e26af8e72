"""AUTOMATIC1111's web API under /sdapi/v1, on the standalone server and the router.

Handlers parse (`server.a1111.requests`), render through the same dispatcher as the OpenAI routes (as a
stream of events, so that /progress can follow it: `server.a1111.tasks`), and shape A1111's answers. Errors
keep the shapes A1111 clients parse: FastAPI's 422 `{"detail": [{"loc": ["body", field], "msg", "type"}]}`
for invalid fields, A1111's `{"error", "detail", "body", "errors"}` for the rest (statuses as on /v1), and
FastAPI's `{"detail": "Not Found"}` for unknown routes (`unknown_route`). `router()` also mounts the lists
scripts read at start-up (`server.a1111.lists`) and sd-webui-controlnet's routes (`server.a1111.controlnet`).

Options and each client's render in progress live where every front door sees them (`server.a1111.shared`,
under --images-dir): `sd_model_checkpoint` picks the model of later requests that do not name one in
`override_settings`, as A1111's does; other options are kept and echoed, and `samples_format`,
`jpeg_quality`, `live_previews_enable`, `show_progress_every_n_steps` and `show_progress_type` ("Full"
previews by the VAE decoder, otherwise a cheap one: `tasks.preview_mode`) are honoured.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import anyio
import msgspec
from litestar import Request, Response, Router, get, post
from litestar.exceptions import HTTPException

from engines.manifest import sdserve_version
from server import errors
from server.a1111 import checkpoints, infotext, units
from server.a1111 import protocol as a1111
from server.a1111 import requests as orders
from server.a1111.controlnet import CONTROLNET_ROUTES
from server.a1111.lists import LIST_ROUTES
from server.a1111.protocol import (
    HTTPErrorBody,
    ImagesResponse,
    Kind,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    ValidationErrorBody,
    ValidationProblem,
)
from server.a1111.shared import SharedState
from server.a1111.tasks import Task, Tasks, idle, interrupted_images, preview_count, preview_mode
from server.errors import ApiError
from server.guards import credential, for_tenant, rate_limit, sdapi_key
from server.state import AppState, client_gone

FASTAPI_PATHS = ("/sdapi/", "/controlnet/")  # FastAPI answers there, in A1111 (sd-webui-controlnet is its extension)
MAX_OPTIONS = 1024  # A1111 has about 600
MAX_OPTION_BYTES = 64 * 1024


@dataclass
class Front:
    """A1111's state: shared by the front doors (the options, each client's progress), and the renders
    running on this one."""

    shared: SharedState
    tasks: Tasks

    @staticmethod
    def of(request: Request) -> Front:
        front = request.app.state.get("a1111")
        if front is None:
            settings = AppState.of(request).settings
            shared = SharedState(Path(settings.images_dir) / "a1111", settings.request_timeout)
            front = request.app.state.a1111 = Front(shared, Tasks(shared))
        return front


@post("/txt2img", status_code=200, guards=[rate_limit], summary="Text to image (AUTOMATIC1111)")
async def txt2img(request: Request) -> Response[ImagesResponse]:
    return await _render(request, "txt2img")


@post("/img2img", status_code=200, guards=[rate_limit],
      summary="Image to image and inpainting (AUTOMATIC1111; white mask = repaint)")
async def img2img(request: Request) -> Response[ImagesResponse]:
    return await _render(request, "img2img")


async def _render(request: Request, kind: Kind) -> Response[ImagesResponse]:
    state, front = AppState.of(request), Front.of(request)
    body = orders.decode(await request.body(), kind)
    options = front.shared.options()
    info = orders.resolve_model(body, options, state)
    request.state.model = info.id
    strength, image, mask = 1.0, None, None
    if isinstance(body, a1111.Img2ImgRequest):
        size = orders.resolve_size(body, info)
        image, mask = await anyio.to_thread.run_sync(orders.img2img_inputs, body, size, state.settings)
        strength = body.denoising_strength
    order, comments = orders.build(body, info, options, state.request_id(request), strength, image, mask)
    guides = await anyio.to_thread.run_sync(units.orders_for, body.alwayson_scripts, info, state.settings,
                                            (order.width, order.height), image)
    previews = preview_count(options, order.steps, order.strength)
    order = msgspec.structs.replace(for_tenant(request, order), partial_images=previews, controlnet=guides,
                                    preview=preview_mode(options, info.tiny_decoder),
                                    events="image_edit" if kind == "img2img" else "image_generation")
    task = Task(client=_client(request), order=order, kind=kind, previews=previews)
    gone = asyncio.ensure_future(client_gone(request))
    try:
        await front.tasks.run(state.renderer, task, gone)
    finally:
        gone.cancel()
    pictures, seeds = (task.finished, task.seeds) if task.finished is not None else interrupted_images(task)
    sampler, schedule = orders.a1111_sampler(order.sampler)
    pictures = [infotext.embed(picture, infotext.write(order, seed, sampler, schedule))
                for picture, seed in zip(pictures, seeds, strict=True)]
    encoded = [base64.b64encode(p).decode("ascii") for p in pictures] if body.send_images else []
    answer = ImagesResponse(images=encoded, parameters=orders.parameters(body, order),
                            info=orders.info(body, order, seeds, sdserve_version(), task.finished is None, comments))
    return Response(answer)


@get("/progress", summary="Progress of this client's current render, with the latest estimate of its image")
async def progress(request: Request, skip_current_image: bool = False) -> ProgressResponse:
    front, client = Front.of(request), _client(request)
    tasks = front.tasks.of(client)
    if tasks:
        return tasks[-1].report(not skip_current_image)
    elsewhere = front.shared.progress(client)  # running on another front door
    if elsewhere is None:
        return idle()
    return msgspec.structs.replace(elsewhere, current_image=None) if skip_current_image else elsewhere


@post("/interrupt", status_code=200, summary="Stop this client's renders; they answer with their latest estimates")
async def interrupt(request: Request) -> dict[str, Any]:
    front, client = Front.of(request), _client(request)
    front.tasks.interrupt(client)
    front.shared.request_interrupt(client)  # and those on other front doors, which poll for it
    return {}


@get("/options", summary="Options; sd_model_checkpoint is the model later requests render on")
async def get_options(request: Request) -> dict[str, Any]:
    options = {**a1111.DEFAULT_OPTIONS, **Front.of(request).shared.options()}
    if not options.get("sd_model_checkpoint"):
        options["sd_model_checkpoint"] = _default_model(AppState.of(request))
    return options


@post("/options", status_code=200, summary="Set options (sd_model_checkpoint selects the model)")
async def set_options(request: Request) -> Response[None]:
    state = AppState.of(request)
    try:
        update = msgspec.json.decode(await request.body() or b"{}", type=dict[str, Any])
    except msgspec.MsgspecError as exc:
        raise orders.invalid("body", f"options must be a JSON object: {exc}") from None
    if "sd_model_checkpoint" in update:
        update["sd_model_checkpoint"] = _known_model(state, update["sd_model_checkpoint"])
    _check_options(update)
    for name, value in update.items():  # options are kept: bounded, as A1111's own set is
        if len(msgspec.json.encode(value)) > MAX_OPTION_BYTES:
            raise orders.invalid(name, f"option values are at most {MAX_OPTION_BYTES} bytes of JSON")
    if "sd_model_checkpoint" in update:  # every option checked first: a refused update loads nothing
        await checkpoints.switch(state, update["sd_model_checkpoint"])  # loaded before the answer, as A1111 does

    def bounded(merged: dict[str, Any]) -> None:
        if len(merged) > MAX_OPTIONS:
            raise orders.invalid("body", f"at most {MAX_OPTIONS} options are kept")

    await anyio.to_thread.run_sync(Front.of(request).shared.update_options, update, bounded)
    return Response(None, media_type="application/json")


@post("/reload-checkpoint", status_code=200, summary="Load the selected checkpoint (sd_model_checkpoint) now")
async def reload_checkpoint(request: Request) -> dict[str, Any]:
    selected = Front.of(request).shared.options().get("sd_model_checkpoint")
    await checkpoints.reload(AppState.of(request), orders.checkpoint_name(selected))
    return {}


@post("/skip", status_code=200, summary="As /interrupt: the images of a request render together, so there is "
      "no next batch to go on to")
async def skip(request: Request) -> None:
    await interrupt.fn(request)


@post("/png-info", status_code=200, summary="The generation parameters an image carries (A1111's PNGs, and ours)")
async def png_info(request: Request) -> PNGInfoResponse:
    body = orders.decode_body(await request.body(), PNGInfoRequest)
    if not body.image.strip():
        raise orders.invalid("image", "image must hold a base64 image")
    image = await anyio.to_thread.run_sync(orders.decode_image, body.image.strip(), "image",
                                           AppState.of(request).settings)
    text, items = infotext.read(image)
    parameters = await anyio.to_thread.run_sync(infotext.parse, text) if text else {}
    return PNGInfoResponse(info=text, items=items, parameters=parameters)


def router() -> Router:
    """A1111's routes and sd-webui-controlnet's, behind the same keys and with the same error shapes."""
    sdapi = Router("/sdapi/v1", route_handlers=[txt2img, img2img, progress, interrupt, skip, get_options,
                                                set_options, png_info, reload_checkpoint,
                                                *checkpoints.CHECKPOINT_ROUTES, *LIST_ROUTES])
    return Router("/", guards=[sdapi_key], exception_handlers={Exception: handle},
                  route_handlers=[sdapi, Router("/controlnet", route_handlers=CONTROLNET_ROUTES)])


def unknown_route(request: Request, exc: Exception) -> Response[Any]:
    """404 and 405 before any route: FastAPI's `{"detail": "Not Found"}` under A1111's and sd-webui-controlnet's
    paths (webuiapi would hand an OpenAI error body to its caller as data), the OpenAI error elsewhere."""
    if isinstance(exc, HTTPException) and request.url.path.startswith(FASTAPI_PATHS):
        return Response({"detail": HTTPStatus(exc.status_code).phrase}, status_code=exc.status_code)
    return errors.handle(request, exc)


def handle(request: Request, exc: Exception) -> Response[Any]:
    """errors.to_response decides the status (the one mapping); here it takes A1111's body shapes."""
    mapped = errors.to_response(exc, request.scope.get("state", {}).get("request_id"))
    detail = mapped.content.error
    if mapped.status_code == 400:
        param = "prompt" if detail.param == "lora" else detail.param  # adapters come from prompt tags here
        loc = ["body", *(int(part) if part.isdigit() else part for part in param.split("."))] \
            if param not in (None, "body") else ["body"]  # list indexes as FastAPI's: numbers
        return Response(ValidationErrorBody([ValidationProblem(loc=loc, msg=detail.message)]), status_code=422)
    body = HTTPErrorBody(error="HTTPException", detail=detail.message, body="", errors=detail.message)
    return Response(body, status_code=mapped.status_code, headers=dict(mapped.headers))


# -- internals -------------------------------------------------------------------------------------


def _client(request: Request) -> str:
    """Whose renders /progress and /interrupt see: the key presented, or the address on an open server."""
    key = credential(request) if AppState.of(request).api_keys else ""
    if key:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return "host:" + (request.client.host if request.client else "-")


def _default_model(state: AppState) -> str:
    try:
        return state.model(None).id
    except ApiError:
        return state.settings.default_model or ""


def _known_model(state: AppState, name: object) -> str:
    model = orders.checkpoint_name(name) if isinstance(name, str) else None
    known = state.renderer.known_models() | set(state.renderer.ready_models())
    if model not in known:
        raise orders.invalid("sd_model_checkpoint", f"model {name!r} not found; available: "
                                 f"{', '.join(sorted(known)) or 'none'}")
    return model


def _check_options(update: dict[str, Any]) -> None:
    every = update.get("show_progress_every_n_steps", 10)
    if not isinstance(every, int) or isinstance(every, bool) or every < -1:
        raise orders.invalid("show_progress_every_n_steps", "show_progress_every_n_steps must be an integer ≥ -1")
    if not isinstance(update.get("live_previews_enable", True), bool):
        raise orders.invalid("live_previews_enable", "live_previews_enable must be true or false")
    if str(update.get("samples_format", "png")).lower() not in orders.FORMATS:
        raise orders.invalid("samples_format", "samples_format must be png, jpg, jpeg or webp")
