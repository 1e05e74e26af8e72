"""A1111 requests → render orders, resolved exactly as the OpenAI routes resolve theirs (same size checks,
seeds, prompt trimming, model defaults), so that the same settings render the same pixels; and the
`info` text and `parameters` echo A1111 answers with.

Invalid fields raise `ApiError(400, param="a.b")`; the sdapi routes answer them as FastAPI's 422 with
`loc: ["body", "a", "b"]`.

img2img inputs, and which A1111 fields change the result:
    init_images[0]           the image (others are ignored); base64, with or without a data-URL prefix
    mask                     white = repaint, binarized at 50 % (as the engines do); inverted when
                             inpainting_mask_invert is 1
    denoising_strength       the strength (0 < s ≤ 1)
    resize_mode              0 and 3: stretch to the size; 1 and 2: center-crop to the aspect, then resize
    mask_blur, inpainting_fill, inpaint_full_res(_padding)   accepted, no effect: the mask is not blurred,
                             the masked area starts from the noised image (A1111's "original"), and the
                             whole image is rendered at the requested size
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from typing import Any, TypeVar

import msgspec
from PIL import Image, ImageOps

from engines import limits
from engines.errors import InvalidRequest
from engines.images import fit
from engines.info import ModelInfo
from server import adapters, images
from server.a1111 import infotext
from server.a1111 import protocol as a1111
from server.a1111.protocol import GenerationRequest, Img2ImgRequest, Info, Kind, Txt2ImgRequest
from server.errors import ApiError, error_path
from server.protocol import MAX_PROMPT, LoraRef, OutputFormat
from server.settings import Settings
from server.state import AppState
from server.wire import RenderOrder

log = logging.getLogger("sdserve.a1111")
T = TypeVar("T")

FORMATS: dict[str, OutputFormat] = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code=f"invalid_{param.split('.')[-1]}")


def decode(body: bytes, kind: Kind) -> Txt2ImgRequest | Img2ImgRequest:
    return decode_body(body, Txt2ImgRequest if kind == "txt2img" else Img2ImgRequest)


def decode_body(body: bytes, target: type[T]) -> T:
    """Lenient like pydantic: "20" is 20. A field of the wrong type names its path."""
    try:
        return msgspec.json.decode(body or b"{}", type=target, strict=False)
    except msgspec.ValidationError as exc:
        text, path = error_path(exc)
        param = ".".join(path)
        raise invalid(param or "body", f"{text}" + (f" ({param})" if param else "")) from None
    except msgspec.DecodeError as exc:
        raise invalid("body", f"the body is not valid JSON: {exc}") from None


def checkpoint_name(name: str | None) -> str | None:
    """A1111 titles look like "model.safetensors [hash]"; the model id is what is left."""
    if not name:
        return None
    name = name.split(" [", 1)[0].strip()
    for suffix in (".safetensors", ".ckpt"):
        name = name.removesuffix(suffix)
    return name


def resolve_model(request: GenerationRequest, options: dict[str, Any], state: AppState) -> ModelInfo:
    override = request.override_settings.sd_model_checkpoint if request.override_settings else None
    param = "override_settings.sd_model_checkpoint" if override else "sd_model_checkpoint"
    name = checkpoint_name(override or options.get("sd_model_checkpoint"))
    try:
        return state.model(name)
    except ApiError as exc:
        if exc.status == 404:
            raise invalid(param, exc.message) from None
        raise


def resolve_sampler(request: GenerationRequest, info: ModelInfo) -> str:
    """A1111's sampler and schedule names → ours; None and "Automatic" keep the model's default."""
    name = (request.sampler_name or request.sampler_index or "").strip()
    schedule = (request.scheduler or "automatic").strip().lower()
    if name.lower().endswith(" karras"):  # the pre-1.9 combined names
        name, schedule = name[: -len(" karras")], "karras"
    if schedule not in a1111.SCHEDULERS:
        raise invalid("scheduler", f"scheduler '{request.scheduler}' is not available here; choose one of "
                      f"{', '.join(a1111.SCHEDULERS.values())}")
    ours = info.defaults.sampler if not name else _sampler(name)
    if schedule == "karras":
        if ours not in a1111.KARRAS:
            raise invalid("scheduler", f"the Karras schedule is available with DPM++ 2M only, not '{name or ours}'")
        ours = a1111.KARRAS[ours]
    return ours


def _sampler(name: str) -> str:
    for a1111_name, ours in a1111.SAMPLERS.items():
        if name.lower() in (a1111_name.lower(), *a1111.SAMPLER_ALIASES[a1111_name]):
            return ours
    choices = ", ".join([*a1111.SAMPLERS, "DPM++ 2M Karras"])
    raise invalid("sampler_name", f"sampler '{name}' is not available here; choose one of {choices}")


def a1111_sampler(sampler: str) -> tuple[str, str]:
    """Ours → A1111's (sampler name, schedule label), for `info` and `parameters`."""
    karras = {v: k for k, v in a1111.KARRAS.items()}
    base = karras.get(sampler, sampler)
    name = next(k for k, v in a1111.SAMPLERS.items() if v == base)
    return name, "Karras" if sampler in karras else "Automatic"


def resolve_size(request: GenerationRequest, info: ModelInfo) -> tuple[int, int]:
    width = info.defaults.width if request.width is None else request.width
    height = info.defaults.height if request.height is None else request.height
    info.sizes.check(width, height, info.id, params=("width", "height"))
    return width, height


def build(request: Txt2ImgRequest | Img2ImgRequest, info: ModelInfo, options: dict[str, Any], request_id: str,
          strength: float = 1.0, image: bytes | None = None, mask: bytes | None = None
          ) -> tuple[RenderOrder, list[str]]:
    """The render order, and the comments `info` carries (adapters left out)."""
    if isinstance(request, Txt2ImgRequest) and request.enable_hr:
        raise invalid("enable_hr", "the hires fix (enable_hr) is not available here; render at the final size")
    prompt = request.prompt.strip()
    if len(prompt) > MAX_PROMPT:
        raise invalid("prompt", f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT}")
    check_scripts(request)
    prompt, lora, comments = prompt_adapters(prompt, info)
    width, height = resolve_size(request, info)
    steps = limits.check_steps(info.defaults.steps if request.steps is None else request.steps)
    cfg = limits.check_guidance(info.defaults.guidance_scale if request.cfg_scale is None else request.cfg_scale,
                                "cfg_scale")
    for param, value in (("batch_size", request.batch_size), ("n_iter", request.n_iter)):
        if value < 1:
            raise invalid(param, f"{param} must be at least 1")
    if request.batch_size * request.n_iter > limits.MAX_IMAGES:
        raise invalid("batch_size", f"batch_size × n_iter is {request.batch_size * request.n_iter}; the limit "
                      f"is {limits.MAX_IMAGES} images")
    if request.seed != -1:  # -1: random
        limits.check_seed(request.seed, request.batch_size * request.n_iter)
    output_format = FORMATS.get(str(options.get("samples_format", "png")).lower(), "png")
    quality = options.get("jpeg_quality")
    order = RenderOrder(
        request_id=request_id, model=info.id, prompt=prompt, negative_prompt=(request.negative_prompt or "").strip()
        or None, width=width, height=height, steps=steps, guidance_scale=float(cfg),
        sampler=resolve_sampler(request, info),
        seed=limits.random_seed() if request.seed == -1 else request.seed,
        n=request.batch_size * request.n_iter, strength=strength, image=image, mask=mask,
        output_format=output_format, lora=lora,
        output_compression=quality if output_format != "png" and isinstance(quality, int) and 0 <= quality <= 100
        else None,
    )
    return order, comments


def check_scripts(request: GenerationRequest) -> None:
    """A1111 refuses scripts it does not have (422); here there are none to select, and ControlNet's is the one
    always-on script (its units: `server.a1111.units`)."""
    if request.script_name:
        raise invalid("script_name", f"Script '{request.script_name}' not found: this server has no selectable "
                      "scripts")
    for name, script in request.alwayson_scripts.items():
        if name.lower() != "controlnet":
            raise invalid(f"alwayson_scripts.{name}", f"always on script {name} not found; this server has "
                          "ControlNet's only")
        units = script.get("args", []) if isinstance(script, dict) else script
        if not isinstance(units, list) or not all(isinstance(unit, dict) for unit in units):
            raise invalid(f"alwayson_scripts.{name}.args", "'args' must be a list of ControlNet units (objects)")


def prompt_adapters(prompt: str, info: ModelInfo) -> tuple[str, list[LoraRef], list[str]]:
    """`<lora:name:weight>` tags, read as on the OpenAI routes; but as A1111 does, a tag naming an adapter the
    model does not offer renders without it, and the comments say so ("Lora not found: name")."""
    try:
        prompt, lora = adapters.resolve(None, prompt)
    except InvalidRequest as exc:
        raise invalid("prompt", exc.message) from None
    offered = {adapter.name for adapter in info.adapters}
    missing = [ref.name for ref in lora if ref.name not in offered]
    comments = [f"Lora {name} not applied: {info.refused_adapters[name]}" for name in missing
                if name in info.refused_adapters]
    unknown = [name for name in missing if name not in info.refused_adapters]
    if unknown:
        comments.append(f"Lora not found: {', '.join(unknown)}")
    for comment in comments:
        log.warning("%s (model %s); rendering without it", comment, info.id)
    return prompt, [ref for ref in lora if ref.name in offered], comments


# -- img2img inputs --------------------------------------------------------------------------------


def img2img_inputs(request: Img2ImgRequest, size: tuple[int, int], settings: Settings) -> tuple[bytes, bytes | None]:
    """The image (PNG) and the engines' mask (PNG, white = repaint), both at `size` (see the module doc)."""
    if not request.init_images:
        raise invalid("init_images", "init_images must hold one base64 image")
    limits.check_strength(request.denoising_strength, "denoising_strength")
    if request.resize_mode not in (0, 1, 2, 3):
        raise invalid("resize_mode", "resize_mode must be 0, 1, 2 or 3")
    picture = decode_image(request.init_images[0], "init_images", settings)
    fitted = resize(picture.convert("RGB"), size, request.resize_mode)
    if not request.mask:
        return images.png(fitted), None
    mask = decode_image(request.mask, "mask", settings).convert("L")
    if request.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    return images.png(fitted), images.png(resize(mask, size, request.resize_mode))


def decode_image(text: str, param: str, settings: Settings) -> Image.Image:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise invalid(param, f"'{param}' is not valid base64: {exc}") from None
    if len(data) > settings.max_upload_bytes:
        raise ApiError(413, f"'{param}' is {len(data)} bytes; the limit is {settings.max_upload_bytes}",
                       param=param, code="file_too_large")
    try:
        return images.decode(data, param, settings.max_pixels)
    except ApiError as exc:
        raise invalid(param, exc.message) from None


def resize(image: Image.Image, size: tuple[int, int], mode: int) -> Image.Image:
    if mode in (0, 3):
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
    return fit(image, *size)


# -- what the answer carries -----------------------------------------------------------------------


def parameters(request: Txt2ImgRequest | Img2ImgRequest, order: RenderOrder) -> dict[str, Any]:
    """The request as rendered: A1111 echoes its parsed request with the defaults filled in."""
    echoed = msgspec.to_builtins(request)
    sampler, schedule = a1111_sampler(order.sampler)
    echoed.update(width=order.width, height=order.height, steps=order.steps, cfg_scale=order.guidance_scale,
                  sampler_name=sampler, scheduler=schedule)
    if isinstance(request, Img2ImgRequest) and not request.include_init_images:
        echoed.update(init_images=None, mask=None)
    return echoed


def info(request: Txt2ImgRequest | Img2ImgRequest, order: RenderOrder, seeds: list[int], version: str,
         interrupted: bool = False, comments: list[str] | None = None) -> str:
    sampler, schedule = a1111_sampler(order.sampler)
    negative = order.negative_prompt or ""
    count = len(seeds)
    texts = [infotext.write(order, seed, sampler, schedule) for seed in seeds]
    body = Info(
        prompt=order.prompt, all_prompts=[order.prompt] * count, negative_prompt=negative,
        all_negative_prompts=[negative] * count, seed=seeds[0] if seeds else order.seed, all_seeds=seeds,
        subseed=request.subseed, all_subseeds=[request.subseed] * count, subseed_strength=request.subseed_strength,
        width=order.width, height=order.height, sampler_name=sampler, cfg_scale=order.guidance_scale, steps=order.steps,
        batch_size=request.batch_size, restore_faces=False, face_restoration_model=None, sd_model_name=order.model,
        sd_model_hash=None, sd_vae_name=None, sd_vae_hash=None, seed_resize_from_w=-1, seed_resize_from_h=-1,
        denoising_strength=order.strength if order.image is not None else None,
        extra_generation_params={"Schedule type": schedule}, index_of_first_image=0, infotexts=texts,
        styles=request.styles or [], job_timestamp=time.strftime("%Y%m%d%H%M%S"), clip_skip=1,
        is_using_inpainting_conditioning=order.mask is not None, version=version, interrupted=interrupted,
        comments="".join(f"{comment}\n" for comment in comments or []),
    )
    return json.dumps(msgspec.to_builtins(body))
