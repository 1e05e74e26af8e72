"""OpenAI image requests → render orders: the size, steps, guidance, sampler, seed and images resolved
against what the model supports, so that everything a node receives is already valid.

The quality and style mapping (documented in the README):
    quality  standard | auto | medium → the model's default steps
             hd | high | xhigh | max → 1.5 × default steps (at least 30 for non-Turbo models)
             low                     → 0.5 × default steps (at least 1)
    style    vivid → the model's default guidance;  natural → 0.7 × that
Explicit `steps` / `guidance_scale` win over both.
"""

from __future__ import annotations

import math
import re

from PIL import Image

from engines import limits
from engines.images import fit
from engines.info import ModelInfo
from server import adapters, images
from server.errors import ApiError
from server.openai.uploads import Upload
from server.protocol import (
    MAX_PROMPT,
    ImageEditJsonRequest,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageVariationRequest,
)
from server.settings import Settings
from server.wire import ControlOrder, RenderOrder

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
Request = ImageGenerationRequest | ImageEditRequest | ImageEditJsonRequest | ImageVariationRequest


def resolve_size(size: str | None, info: ModelInfo) -> tuple[int, int]:
    sizes, default = info.sizes, (info.defaults.width, info.defaults.height)
    if size is None or size == "auto":
        return default
    match = _SIZE.match(size)
    allowed = f"sizes are WIDTHxHEIGHT ({sizes.rule}), or 'auto' ({default[0]}x{default[1]}) for model '{info.id}'"
    if not match:
        raise ApiError(400, f"invalid size '{size}': {allowed}", param="size", code="invalid_size")
    width, height = int(match.group(1)), int(match.group(2))
    if not sizes.contains(width, height):
        raise ApiError(400, f"size '{size}' is not supported: {allowed}", param="size", code="invalid_size")
    return width, height


def resolve_steps(request: Request, info: ModelInfo) -> int:
    if request.steps is not None:
        return request.steps
    default = info.defaults.steps
    quality = getattr(request, "quality", None)
    if quality in ("hd", "high", "xhigh", "max"):
        steps = math.ceil(default * 1.5)
        return min(limits.MAX_STEPS, steps if info.variant == "turbo" else max(30, steps))
    if quality == "low":
        return max(1, round(default * 0.5))
    return default


def rendered_quality(quality: str | None) -> str:
    """The quality a response reports, in OpenAI's response terms (low, medium, high): what the steps used."""
    if quality in ("hd", "high", "xhigh", "max"):
        return "high"
    return "low" if quality == "low" else "medium"


def resolve_guidance(request: Request, info: ModelInfo) -> float:
    if request.guidance_scale is not None:
        return request.guidance_scale
    natural = getattr(request, "style", None) == "natural"
    return round(info.defaults.guidance_scale * (0.7 if natural else 1.0), 4)


def resolve_prompt(prompt: str) -> str:
    text = prompt.strip()
    if not text:
        raise ApiError(400, "prompt must not be empty", param="prompt", code="invalid_prompt")
    return _within_limit(text, "prompt")


def _within_limit(text: str, param: str) -> str:
    """Characters are checked here, before anything is queued; tokens (what a render costs) are checked by
    the engine pool before its queue (`engines.tokenizer.MAX_WINDOWS`)."""
    if len(text) > MAX_PROMPT:
        raise ApiError(400, f"{param} is {len(text)} characters; the limit is {MAX_PROMPT}", param=param,
                       code=f"invalid_{param}")
    return text


def resolve_background(request: Request) -> None:
    if getattr(request, "background", None) == "transparent":
        raise ApiError(400, "background 'transparent' is not supported: Stable Diffusion draws no alpha; use "
                       "'opaque' or 'auto'", param="background", code="invalid_background")


def build(request: Request, info: ModelInfo, request_id: str, prompt: str, strength: float,
          image: bytes | None = None, mask: bytes | None = None,
          controlnet: list[ControlOrder] | None = None) -> RenderOrder:
    width, height = resolve_size(request.size, info)
    resolve_background(request)
    streamed = bool(getattr(request, "stream", None))
    events = "image_edit" if isinstance(request, ImageEditRequest | ImageEditJsonRequest) else "image_generation"
    prompt, lora = adapters.resolve(request.lora, prompt)
    decoder = limits.check_decoder(request.decoder or "full", info.id, info.tiny_decoder)
    return RenderOrder(
        request_id=request_id,
        model=info.id,
        prompt=prompt,
        negative_prompt=None if request.negative_prompt is None else _within_limit(request.negative_prompt,
                                                                                   "negative_prompt"),
        width=width,
        height=height,
        steps=resolve_steps(request, info),
        guidance_scale=resolve_guidance(request, info),
        sampler=request.sampler or info.defaults.sampler,
        seed=limits.random_seed() if request.seed is None else limits.check_seed(request.seed, request.n or 1),
        n=request.n or 1,
        strength=strength,
        image=image,
        mask=mask,
        output_format=request.output_format or "png",
        output_compression=request.output_compression,
        quality=rendered_quality(getattr(request, "quality", None)),
        partial_images=(getattr(request, "partial_images", None) or 0) if streamed else 0,
        events=events if streamed else None,
        lora=lora,
        decoder=decoder,
        controlnet=controlnet or [],
    )


def edit_inputs(image: Upload, mask: Upload | None, settings: Settings, size: tuple[int, int]
                ) -> tuple[bytes, bytes | None]:
    """The image (PNG) and the engines' mask (PNG, white = repaint), both fitted to `size`, from OpenAI edit
    semantics: the mask's fully transparent pixels are the edit area; without a mask, the image's own
    transparency is; an opaque image without a mask is re-imagined whole (no mask)."""
    picture = images.decode(image.data, image.param, settings.max_pixels)
    if mask is not None:
        alpha_source = images.decode(mask.data, mask.param, settings.max_pixels)
        if alpha_source.size != picture.size:
            raise ApiError(400, f"the mask is {_wxh(alpha_source)} but the image is {_wxh(picture)}; they must "
                           "have the same size", param="mask", code="invalid_mask")
        if not images.has_alpha(alpha_source):
            raise ApiError(400, "the mask must have an alpha channel (transparent pixels mark the area to edit)",
                           param="mask", code="invalid_mask")
        engine_mask = images.edit_mask(alpha_source) or Image.new("L", picture.size, 0)
    else:
        engine_mask = images.edit_mask(picture) if images.has_alpha(picture) else None
    fitted = images.png(fit(picture.convert("RGB"), *size))
    return fitted, None if engine_mask is None else images.png(fit(engine_mask, *size))


def variation_input(image: Upload, settings: Settings, size: tuple[int, int]) -> bytes:
    picture = images.decode(image.data, image.param, settings.max_pixels)
    return images.png(fit(picture.convert("RGB"), *size))


def _wxh(image: Image.Image) -> str:
    return f"{image.width}x{image.height}"
