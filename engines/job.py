"""A request checked against one model (`Pipeline.check_inputs`): every value resolved and validated, and the
kind of input decided once, so that the later stages only read what to do:

    request         plain UNet (4 channels)                     inpainting UNet (9 channels)
    text            latents start from noise                    the same, conditioned on an all-ones mask
                                                                of a zero image
    image           from the image's latents, noised            the same, with an all-zeros mask
    image + mask    from the image's latents, noised¹; the      from the image's latents, noised¹;
                    area outside the mask is reset to the       conditioned on the mask and the masked
                    image every step ("blend")                  image's latents ("condition")

¹ from noise at strength 1, as diffusers' inpainting pipelines do."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import numpy as np

from engines import controlnet, images, limits, schedulers
from engines import manifest as mf
from engines.errors import InvalidRequest
from engines.info import ModelInfo
from engines.render import RenderRequest, Tokens
from engines.tokenizer import PromptTokenizer, tokenize

Masking = Literal["blend", "condition"]


@dataclass(frozen=True)
class Inputs:
    """The image inputs of a request and what they make of a render (the table above)."""

    image: np.ndarray | None  # (1, 3, H, W) in [-1, 1]
    mask: np.ndarray | None  # (1, 1, H, W), 1 = repaint
    strength: float  # 1.0 unless an image is given
    from_noise: bool  # the latents start from noise, not from the noised image
    masking: Masking | None

    @property
    def needs_image_latents(self) -> bool:
        """The image's latents are noised into the start, or blended back outside the mask."""
        return self.image is not None and (not self.from_noise or self.masking == "blend")


@dataclass(frozen=True)
class Job:
    """A request with every value resolved against the model: what the stages consume."""

    request: RenderRequest
    tokens: Tokens
    width: int
    height: int
    steps: int  # schedule length (`limits.schedule_steps`: at least one step runs at a low strength)
    guided: bool  # classifier-free guidance: the UNet also sees the negative prompt
    scheduler: schedulers.Scheduler
    seeds: list[int]
    inputs: Inputs
    controls: tuple[controlnet.Control, ...] = ()  # its ControlNet units, checked, their images at the render size

    @property
    def copies(self) -> int:
        """UNet rows per image: the negative and the positive prompt when guided."""
        return limits.rows_per_image(self.request.guidance_scale)

    @property
    def strength(self) -> float:
        return self.inputs.strength


def resolve(request: RenderRequest, info: ModelInfo, tokenizers: dict[str, PromptTokenizer],
            scheduler_config: Mapping[str, Any]) -> Job:
    """The request with the model's defaults filled in and every field checked (InvalidRequest naming it)."""
    request = with_defaults(request, info.defaults)
    tokens = tokens_of(request, info.id, tokenizers)
    info.sizes.check(request.width, request.height, info.id)
    limits.check_steps(request.steps)
    guidance = limits.check_guidance(request.guidance_scale)
    if isinstance(request.n, bool) or not isinstance(request.n, int) or request.n < 1:
        raise InvalidRequest("n", "n must be an integer ≥ 1")
    seed = limits.random_seed() if request.seed is None else limits.check_seed(request.seed, request.n)
    scheduler = schedulers.create(request.sampler, scheduler_config)
    limits.check_decoder(request.decoder, info.id, info.tiny_decoder)
    inputs = check_images(request, info.inpainting_unet)
    controls = controlnet.check_units(request, info)
    return Job(request=request, tokens=tokens, width=request.width, height=request.height,
               steps=limits.schedule_steps(request.steps, inputs.strength), guided=limits.guided(guidance),
               scheduler=scheduler, seeds=[seed + i for i in range(request.n)], inputs=inputs, controls=controls)


def tokens_of(request: RenderRequest, model: str, tokenizers: dict[str, PromptTokenizer]) -> Tokens:
    """The request's `tokens` when it brings them (made by this model for these prompts), else made now."""
    tokens = request.tokens
    if tokens is None:
        return tokenize(model, tokenizers, request.prompt, request.negative_prompt)
    if (tokens.model, tokens.prompt, tokens.negative_prompt) != (model, request.prompt, request.negative_prompt):
        raise InvalidRequest("tokens", "these tokens were made for other prompts or another model "
                             "(`Pipeline.tokenize` of this request)")
    return tokens


def with_defaults(request: RenderRequest, defaults: mf.Defaults) -> RenderRequest:
    """The request with the model's defaults where it left size, steps, guidance or sampler unset."""
    return msgspec.structs.replace(
        request,
        width=defaults.width if request.width is None else request.width,
        height=defaults.height if request.height is None else request.height,
        steps=defaults.steps if request.steps is None else request.steps,
        guidance_scale=defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale,
        sampler=defaults.sampler if request.sampler is None else request.sampler,
    )


def check_images(request: RenderRequest, inpainting_unet: bool) -> Inputs:
    """The image and mask as arrays at the render size, the strength, and the kind of input (module doc)."""
    width, height = request.width, request.height
    if request.mask is not None and request.image is None:
        raise InvalidRequest("mask", "a mask needs an image")
    if request.image is None:
        if inpainting_unet:  # an inpainting UNet draws from scratch as "repaint everything"
            return Inputs(np.zeros((1, 3, height, width), np.float32), np.ones((1, 1, height, width), np.float32),
                          1.0, from_noise=True, masking="condition")
        return Inputs(None, None, 1.0, from_noise=True, masking=None)
    if not hasattr(request.image, "size") or not hasattr(request.image, "convert"):
        raise InvalidRequest("image", "image must be a PIL image")
    strength = request.strength
    strength = limits.check_strength(limits.default_strength(request.mask is not None) if strength is None
                                     else strength)
    image = images.decoded("image", lambda: images.to_array(request.image, width, height))
    mask = None
    if request.mask is not None:
        if not hasattr(request.mask, "size") or request.mask.size != request.image.size:
            raise InvalidRequest("mask", f"the mask must have the image's size {request.image.size}")
        mask = images.decoded("mask", lambda: images.mask_to_array(request.mask, width, height))
    elif inpainting_unet:  # image to image on an inpainting UNet: nothing masked
        mask = np.zeros((1, 1, height, width), np.float32)
    masking: Masking | None = None if mask is None else "condition" if inpainting_unet else "blend"
    from_noise = mask is not None and strength >= 1.0
    return Inputs(image, mask, strength, from_noise=from_noise, masking=masking)

