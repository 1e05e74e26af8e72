"""The public OpenAI Images API (`/v1`) as msgspec Structs: request bodies, responses, stream events, errors
and model cards. No framework or ML imports here; the router ↔ node protocol is `server.wire`.

Optional fields accept `null` as "absent", since OpenAI clients and proxies (LiteLLM) send either.
Unknown fields are ignored: OpenAI clients add fields over time.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from engines import limits
from engines.limits import Bounds

Quality = Literal["standard", "hd", "low", "medium", "high", "xhigh", "max", "auto"]
Background = Literal["auto", "opaque", "transparent"]
Style = Literal["vivid", "natural"]
ResponseFormat = Literal["url", "b64_json"]
OutputFormat = Literal["png", "jpeg", "webp"]
Sampler = Literal["euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "lcm"]
Decoder = Annotated[Literal["full", "tiny"], Meta(description="the final image's decoder (extension): full (the VAE, "
                                                  "default) or tiny (the model's TAESD: faster, less faithful)")]

MAX_PROMPT = 4000  # characters; tokens (what a render costs) are checked by the node before its queue

# `extra_json_schema={"extra": …}` is copied into the OpenAPI schema as it is: Litestar drops a bound of 0
# (falsy) and cannot tell that an `Any` part is a file.
_FROM_ZERO = {"extra": {"minimum": 0}}
_BINARY = {"type": "string", "format": "binary"}

N = Annotated[int, Meta(ge=1, le=limits.MAX_IMAGES, description=f"number of images, 1-{limits.MAX_IMAGES}")]
Compression = Annotated[int, Meta(ge=0, le=100, description="jpeg/webp quality, 0-100", extra_json_schema=_FROM_ZERO)]
Seed = Annotated[int, Meta(ge=0, le=limits.MAX_SEED, description="seed of the first image; image i uses seed + i",
                           extra_json_schema=_FROM_ZERO)]
Steps = Annotated[int, Meta(ge=limits.MIN_STEPS, le=limits.MAX_STEPS, description="denoising steps (extension)")]
Guidance = Annotated[float, Meta(ge=limits.MIN_GUIDANCE, le=limits.MAX_GUIDANCE,
                                 description="classifier-free guidance scale (extension)",
                                 extra_json_schema=_FROM_ZERO)]
# Above 0: at 0 nothing would be re-imagined (the engines refuse it too).
Strength = Annotated[float, Meta(gt=0, le=limits.MAX_STRENGTH,
                                 description="how much of the input image to re-imagine (extension)",
                                 extra_json_schema={"extra": {"exclusiveMinimum": 0}})]
# Multipart file parts; the framework hands over its upload objects.
File = Annotated[Any, Meta(description="an image file: PNG, JPEG or WebP", extra_json_schema={"extra": _BINARY})]
Files = Annotated[Any, Meta(description="image files (the first is used)",
                            extra_json_schema={"extra": {"type": "array", "items": _BINARY}})]


Scale = Annotated[float, Meta(ge=-limits.MAX_LORA_SCALE, le=limits.MAX_LORA_SCALE,
                              description="adapter weight, as diffusers' set_adapters weights")]


class LoraRef(msgspec.Struct, kw_only=True):
    """One LoRA adapter a request applies (extension): a name from `GET /v1/models`, and its scale."""

    name: str
    scale: Scale = 1.0


ControlScale = Annotated[float, Meta(ge=0, le=limits.MAX_CONTROLNET_SCALE, extra_json_schema=_FROM_ZERO,
                                     description="ControlNet weight, as diffusers' controlnet_conditioning_scale")]
Fraction = Annotated[float, Meta(ge=0, le=1, extra_json_schema=_FROM_ZERO,
                                 description="a fraction of the schedule, as diffusers' control_guidance_start/end")]
Threshold = Annotated[float, Meta(ge=0, le=limits.MAX_CANNY_THRESHOLD, extra_json_schema=_FROM_ZERO,
                                  description="a canny threshold on OpenCV's L1 gradient magnitude")]
Preprocess = Literal["none", "canny"]


class ControlNetUnit(msgspec.Struct, kw_only=True):
    """One ControlNet guiding a render (extension): a ControlNet of the model (`GET /v1/models`), its control
    image (a data URL, plain base64, or an https URL fetched as JSON edits' image_url), weight and window."""

    model: str
    image: str
    scale: ControlScale = 1.0
    start: Fraction = 0.0
    end: Fraction = 1.0
    preprocess: Preprocess = "none"
    low: Threshold = limits.CANNY_THRESHOLDS[0]
    high: Threshold = limits.CANNY_THRESHOLDS[1]


ControlNets = Annotated[list[ControlNetUnit], Meta(max_length=limits.MAX_CONTROLNETS)]


class RenderOptions(msgspec.Struct, kw_only=True):
    """The fields every image route takes: OpenAI's, then our extensions."""

    model: str | None = None
    n: N | None = None
    size: str | None = None
    response_format: ResponseFormat | None = None
    output_format: OutputFormat | None = None
    output_compression: Compression | None = None
    user: str | None = None
    negative_prompt: str | None = None
    seed: Seed | None = None
    steps: Steps | None = None
    guidance_scale: Guidance | None = None
    sampler: Sampler | None = None
    strength: Strength | None = None
    # LoRA adapters, at most MAX_ADAPTERS (JSON text on multipart routes); `<lora:name:w>` prompt tags add to them
    lora: list[LoraRef] | str | None = None
    decoder: Decoder | None = None
    # ControlNet units, at most MAX_CONTROLNETS (JSON text on multipart routes)
    controlnet: ControlNets | str | None = None


PartialImages = Annotated[int, Meta(ge=0, le=3, description="partial images per image while streaming, 0-3",
                                     extra_json_schema=_FROM_ZERO)]


class PromptedOptions(RenderOptions, kw_only=True):
    """OpenAI's fields of the prompted routes (generations and edits): streaming and today's extras."""

    prompt: str
    quality: Quality | None = None
    stream: bool | None = None
    partial_images: PartialImages | None = None
    background: Background | None = None  # "transparent" is refused: SD draws no alpha
    moderation: str | None = None  # accepted; there is no moderation model
    input_fidelity: str | None = None  # accepted, no effect


class ImageGenerationRequest(PromptedOptions, kw_only=True):
    style: Style | None = None


class ImageEditRequest(PromptedOptions, kw_only=True):
    """multipart/form-data; numbers arrive as strings and are converted."""

    image: File = None
    image_list: Files = msgspec.field(default=None, name="image[]")  # one part or several; the first is used
    mask: File = None


class ImageRef(msgspec.Struct, kw_only=True):
    image_url: str | None = None  # a data: URL (or http(s) where the operator allows)
    file_id: str | None = None  # refused: there is no Files API here


class ImageEditJsonRequest(PromptedOptions, kw_only=True):
    """/v1/images/edits as application/json, OpenAI's newer form."""

    images: list[ImageRef] | None = None
    mask: ImageRef | None = None


class ImageVariationRequest(RenderOptions, kw_only=True):
    image: File = None


class ImageData(msgspec.Struct, omit_defaults=True):
    seed: int  # extension: the seed that reproduces this image alone
    url: str | None = None
    b64_json: str | None = None


class InputTokensDetails(msgspec.Struct):
    text_tokens: int
    image_tokens: int = 0


class Usage(msgspec.Struct):
    """Our models read text tokens and write no image tokens."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of_text(cls, tokens: int) -> Usage:
        """A render whose prompts came to `tokens` text tokens."""
        return cls(input_tokens=tokens, input_tokens_details=InputTokensDetails(text_tokens=tokens), output_tokens=0,
                   total_tokens=tokens)


class ImagesResponse(msgspec.Struct):
    created: int
    data: list[ImageData]
    model: str
    size: str
    output_format: OutputFormat
    quality: str = "medium"
    background: str = "opaque"
    usage: Usage | None = None  # as OpenAI's GPT image models report it


class ImageEvent(msgspec.Struct, kw_only=True):
    """What OpenAI's image stream events share, plus our `index` (image i of `n`) and `seed`."""

    type: str
    b64_json: str
    created_at: int
    size: str
    quality: str
    background: str
    output_format: OutputFormat
    index: int
    seed: int


class PartialImageEvent(ImageEvent, kw_only=True):
    """`image_generation.partial_image` / `image_edit.partial_image`."""

    partial_image_index: int


class CompletedImageEvent(ImageEvent, kw_only=True):
    """`image_generation.completed` / `image_edit.completed`."""

    usage: Usage


class ErrorEvent(msgspec.Struct):
    """A failure after the stream started: the last event."""

    error: ErrorDetail
    type: str = "error"


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    error: ErrorDetail


class SizeRange(msgspec.Struct):
    min: int
    max: int
    step: int


class AdapterCard(msgspec.Struct):
    name: str
    rank: int
    parts: list[str]  # the components it changes: unet, text_encoder, text_encoder_2


class ControlNetCard(msgspec.Struct):
    name: str  # what a unit's `model` names
    family: str


class StrengthDefaults(msgspec.Struct):
    """The strength an edit or variation that sets none renders at (`engines.limits.default_strength`)."""

    image: float  # an edit without a mask (image to image)
    mask: float  # an edit with a mask (inpainting)
    variation: float


class ModelCard(msgspec.Struct):
    id: str
    created: int
    object: str = "model"
    owned_by: str = "sdserve"
    family: str = ""
    variant: str = ""
    sizes: SizeRange | None = None
    default_size: str = ""
    default_steps: int = 0
    default_guidance_scale: float = 0.0
    default_sampler: str = ""
    samplers: list[str] = msgspec.field(default_factory=list)
    backends: list[str] = msgspec.field(default_factory=list)
    lora_rank: int = 0  # largest total adapter rank per request; 0: no LoRA support
    adapters: list[AdapterCard] = msgspec.field(default_factory=list)
    controlnet_inputs: bool = False  # exported with --controlnet: it can take ControlNets
    controlnets: list[ControlNetCard] = msgspec.field(default_factory=list)
    limits: Bounds = msgspec.field(default_factory=Bounds)  # the bounds of every request field, for forms
    default_strength: StrengthDefaults | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"
