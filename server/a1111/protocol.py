"""AUTOMATIC1111's web API (`/sdapi/v1`) as msgspec Structs: the field names, defaults and response
shapes of its `modules/api/models.py`, and its sampler and scheduler names. No framework imports here.

Fields A1111 has and we have no use for (styles, subseeds, restore_faces, scripts…) are accepted and
ignored, as unknown fields are. Numbers are decoded leniently ("20" is 20), as pydantic does.
Absent size, steps, cfg_scale and sampler take the model's defaults (A1111's own are 512x512, 50 steps,
cfg 7, which would ruin a Turbo model), so a request renders what the OpenAI route renders.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

# A1111 sampler names (and the aliases A1111 also accepts) → ours. A1111 ≥ 1.9 takes the schedule
# separately (`scheduler`); older clients put it in the name ("DPM++ 2M Karras").
SAMPLERS: dict[str, str] = {
    "DPM++ 2M": "dpmpp_2m",
    "Euler a": "euler_a",
    "Euler": "euler",
    "DDIM": "ddim",
    "LCM": "lcm",
}
SAMPLER_ALIASES: dict[str, list[str]] = {
    "DPM++ 2M": ["k_dpmpp_2m"],
    "Euler a": ["k_euler_a", "k_euler_ancestral"],
    "Euler": ["k_euler"],
    "DDIM": ["ddim"],
    "LCM": ["k_lcm"],
}
KARRAS = {"dpmpp_2m": "dpmpp_2m_karras"}  # our samplers that have a Karras schedule
# A1111 scheduler (name, label): "automatic" is the sampler's own schedule.
SCHEDULERS: dict[str, str] = {"automatic": "Automatic", "karras": "Karras"}

# What GET /options answers before anything was set; any other option POSTed is kept and echoed.
DEFAULT_OPTIONS: dict[str, Any] = {
    "sd_model_checkpoint": None,  # filled with the server's default model
    "sd_checkpoint_hash": None,
    "samples_format": "png",  # png | jpg | jpeg | webp: the format of returned images
    "jpeg_quality": 80,
    "live_previews_enable": True,
    "show_progress_every_n_steps": 10,  # -1: no preview while rendering; 0: every step
    "show_progress_type": "Approx NN",  # previews: "Full" (the VAE), else cheap (`tasks.preview_mode`)
    "CLIP_stop_at_last_layers": 1,
    "eta_noise_seed_delta": 0,
}


class OverrideSettings(msgspec.Struct, kw_only=True):
    sd_model_checkpoint: str | None = None


class GenerationRequest(msgspec.Struct, kw_only=True):
    """The fields txt2img and img2img share (A1111's `StableDiffusionProcessing`)."""

    prompt: str = ""
    negative_prompt: str | None = ""
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # the older name of sampler_name
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    override_settings: OverrideSettings | None = None
    script_name: str | None = None  # a selectable script: none here, so any name is a 422
    alwayson_scripts: dict[str, Any] = msgspec.field(default_factory=dict)  # only ControlNet's: a1111.units
    send_images: bool = True
    save_images: bool = False
    # accepted, no effect here: one line each in the README
    styles: list[str] | None = None
    subseed: int = -1
    subseed_strength: float = 0.0
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None


class Txt2ImgRequest(GenerationRequest, kw_only=True):
    enable_hr: bool = False  # the hires fix is not offered: true is a 422
    denoising_strength: float | None = None  # only read by the hires fix


class Img2ImgRequest(GenerationRequest, kw_only=True):
    init_images: list[str] | None = None  # base64, with or without a data-URL prefix; the first is used
    mask: str | None = None  # base64; white = repaint
    denoising_strength: float = 0.75
    resize_mode: int = 0  # 0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale
    mask_blur: int | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    include_init_images: bool = False


class ImagesResponse(msgspec.Struct):
    """A1111's TextToImageResponse / ImageToImageResponse."""

    images: list[str]  # base64 images, no data-URL prefix
    parameters: dict[str, Any]  # the request as rendered (defaults filled in)
    info: str  # JSON text, as A1111's `Processed.js()`


class Info(msgspec.Struct):
    """The keys of A1111's `Processed.js()` that clients read (seeds above all)."""

    prompt: str
    all_prompts: list[str]
    negative_prompt: str
    all_negative_prompts: list[str]
    seed: int
    all_seeds: list[int]
    subseed: int
    all_subseeds: list[int]
    subseed_strength: float
    width: int
    height: int
    sampler_name: str
    cfg_scale: float
    steps: int
    batch_size: int
    restore_faces: bool
    face_restoration_model: None
    sd_model_name: str
    sd_model_hash: None
    sd_vae_name: None
    sd_vae_hash: None
    seed_resize_from_w: int
    seed_resize_from_h: int
    denoising_strength: float | None
    extra_generation_params: dict[str, Any]
    index_of_first_image: int
    infotexts: list[str]
    styles: list[str]
    job_timestamp: str
    clip_skip: int
    is_using_inpainting_conditioning: bool
    version: str
    interrupted: bool = False  # ours: the render was interrupted; images are the estimates at that step
    comments: str = ""  # A1111's `Processed.comments`: one line each, e.g. "Lora not found: name"


class ProgressState(msgspec.Struct):
    """A1111's `shared.state.dict()`."""

    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(msgspec.Struct):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class SDModelItem(msgspec.Struct):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


class SamplerItem(msgspec.Struct):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(msgspec.Struct):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = -1.0
    need_inner_model: bool | None = False


class LoraItem(msgspec.Struct):
    """As A1111's Lora extension lists them."""

    name: str
    alias: str
    path: str
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class EmbeddingsResponse(msgspec.Struct):
    """Textual-inversion embeddings by name: none here (the engines load none)."""

    loaded: dict[str, Any] = msgspec.field(default_factory=dict)
    skipped: dict[str, Any] = msgspec.field(default_factory=dict)


class MemoryResponse(msgspec.Struct):
    ram: dict[str, Any]  # free, used (this process's resident memory), total; or error
    cuda: dict[str, Any]  # A1111 reads torch's counters; or error


class ScriptsList(msgspec.Struct):
    txt2img: list[str]
    img2img: list[str]


class PNGInfoRequest(msgspec.Struct):
    image: str = ""  # base64, with or without a data-URL prefix


class PNGInfoResponse(msgspec.Struct):
    info: str  # the infotext ("" when the image has none)
    items: dict[str, Any]  # the image's other text fields
    parameters: dict[str, Any]  # the infotext parsed, as A1111's `parse_generation_parameters`


class ValidationProblem(msgspec.Struct):
    """One entry of FastAPI's 422 `detail` list."""

    loc: list[str]
    msg: str
    type: str = "value_error"


class ValidationErrorBody(msgspec.Struct):
    detail: list[ValidationProblem]


class HTTPErrorBody(msgspec.Struct):
    """What A1111's exception middleware answers for every other error."""

    error: str
    detail: str
    body: str
    errors: str


Kind = Literal["txt2img", "img2img"]


# -- sd-webui-controlnet (/controlnet) ----------------------------------------------------------------------


class DetectRequest(msgspec.Struct, kw_only=True):
    """POST /controlnet/detect. -1 (and values outside the module's sliders) take the module's defaults."""

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = msgspec.field(default_factory=list)
    controlnet_images: list[str] = msgspec.field(default_factory=list)  # the name webuiapi sends
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = msgspec.field(default_factory=list)  # no module here takes a mask: unused
    low_vram: bool = False


class DetectResponse(msgspec.Struct):
    info: str
    images: list[str]  # base64 PNGs


class Slider(msgspec.Struct):
    name: str
    value: float
    min: float
    max: float
    step: float


class ModuleDetail(msgspec.Struct):
    model_free: bool
    sliders: list[Slider]


class ModuleList(msgspec.Struct):
    module_list: list[str]
    module_detail: dict[str, ModuleDetail]


class ModelList(msgspec.Struct):
    model_list: list[str]  # "name [hash]", the hash the first 8 hex digits of the graph's sha256


class VersionResponse(msgspec.Struct):
    version: int
