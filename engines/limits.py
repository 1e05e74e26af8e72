"""What a render request may ask for, and what it costs: each rule written once, for the engines and the server.

The engines check every request against these (`Pipeline.check_inputs`, `engines.lora`, the schedulers);
the server declares the same bounds on its Structs (`Meta(ge=MIN_STEPS, le=MAX_STEPS)`) and calls the same
checks where it validates by hand, so a rule and its message exist once. Each check raises
`InvalidRequest(param, message)`; `param` defaults to the engines' field name and a caller whose API spells
it differently (A1111's `cfg_scale`, `denoising_strength`) passes its own.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from engines.errors import InvalidRequest

if TYPE_CHECKING:
    from engines.render import ControlUnit

MIN_STEPS, MAX_STEPS = 1, 150
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 30.0
GUIDED_ABOVE = 1.0  # classifier-free guidance runs only above this scale (diffusers' `do_classifier_free_guidance`)
# strength is in (0, 1]: at 0 nothing would be re-imagined
MAX_STRENGTH = 1.0
# The largest seed of any image (image i of seed s uses s + i). JSON numbers reach JavaScript clients (the
# playground, A1111 front ends, OpenAI's Node SDK) as doubles, exact only up to Number.MAX_SAFE_INTEGER =
# 2**53 - 1; Python clients send any int, and numpy's PCG64 takes any non-negative int. So 2**53 - 1 is the
# largest seed every client can send and read back (the `seeds` of a reply) unchanged.
MAX_SEED = 2**53 - 1
RANDOM_SEEDS = 2**31  # a seed left unset is drawn below this: short to read and type back, as A1111's are
# A low strength lengthens the schedule until one step runs (`schedule_steps`); samplers refuse schedules longer
# than the training schedule, 1000 timesteps for every Stable Diffusion
LONGEST_SCHEDULE = 1000
MAX_IMAGES = 10  # per API request (OpenAI's n; A1111's batch_size × n_iter); the engines render any n, in chunks
MAX_ADAPTERS = 8  # LoRA adapters per request
MAX_LORA_SCALE = 4.0  # |scale| of one adapter; far beyond what adapters are trained for, still finite
MAX_CONTROLNETS = 4  # ControlNet units per request (diffusers' MultiControlNet adds them up)
MAX_CONTROLNET_SCALE = 2.0  # a unit's scale is in [0, 2] (diffusers' `controlnet_conditioning_scale`)
# Control-image preprocessors: "none" (the client sends the map) or "canny" with its thresholds (low, high) on
# OpenCV's L1 gradient magnitude, in sd-webui-controlnet's slider range and with its defaults
PREPROCESSORS: tuple[str, ...] = ("none", "canny")
MAX_CANNY_THRESHOLD = 255.0
CANNY_THRESHOLDS = (100.0, 200.0)
# The final image's decoder: the VAE, or the model's tiny decoder (TAESD) where it was exported with one
DECODERS: tuple[str, ...] = ("full", "tiny")


class Bounds(msgspec.Struct, frozen=True, kw_only=True):
    """The bounds above as one value, for clients that build forms from them (the playground)."""

    min_steps: int = MIN_STEPS
    max_steps: int = MAX_STEPS
    min_guidance: float = MIN_GUIDANCE
    max_guidance: float = MAX_GUIDANCE
    max_strength: float = MAX_STRENGTH
    max_seed: int = MAX_SEED
    max_images: int = MAX_IMAGES
    max_adapters: int = MAX_ADAPTERS
    max_lora_scale: float = MAX_LORA_SCALE
    max_controlnets: int = MAX_CONTROLNETS
    max_controlnet_scale: float = MAX_CONTROLNET_SCALE


BOUNDS = Bounds()


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_steps(steps: object, param: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not MIN_STEPS <= steps <= MAX_STEPS:
        raise InvalidRequest(param, f"{param} must be an integer from {MIN_STEPS} to {MAX_STEPS}")
    return steps


def check_guidance(guidance: object, param: str = "guidance_scale") -> float:
    if not _number(guidance) or not MIN_GUIDANCE <= guidance <= MAX_GUIDANCE:  # type: ignore[operator]
        raise InvalidRequest(param, f"{param} must be a number from {MIN_GUIDANCE:g} to {MAX_GUIDANCE:g}")
    return float(guidance)  # type: ignore[arg-type]


def check_strength(strength: object, param: str = "strength") -> float:
    if not _number(strength) or not 0.0 < strength <= MAX_STRENGTH:  # type: ignore[operator]
        raise InvalidRequest(param, f"{param} must be a number in (0, {MAX_STRENGTH:g}]")
    return float(strength)  # type: ignore[arg-type]


def check_seed(seed: object, n: int = 1, param: str = "seed") -> int:
    """The first image's seed: every image's seed (seed + i for n images) within 0..MAX_SEED."""
    largest = MAX_SEED - (n - 1)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= largest:
        for_n = f" for {n} images" if n > 1 else ""
        raise InvalidRequest(param, f"{param} must be an integer from 0 to {largest}{for_n} (image i uses seed + i)")
    return seed


def check_decoder(decoder: object, model: str, has_tiny: bool, param: str = "decoder") -> str:
    """The final image's decoder: "tiny" only where the model has one."""
    if decoder not in DECODERS:
        raise InvalidRequest(param, f"decoder must be one of: {', '.join(DECODERS)}")
    if decoder == "tiny" and not has_tiny:
        raise InvalidRequest(param, f"model '{model}' has no tiny decoder (export it with `python -m export … "
                             "--tiny-decoder`)")
    return decoder


def random_seed() -> int:
    return secrets.randbelow(RANDOM_SEEDS)


def check_adapters(choice: Sequence[tuple[str, object]], param: str = "lora") -> None:
    """A request's LoRA adapters [(name, scale), …]: how many, and each scale (which adapters a model offers
    is the model's to say: `lora_unsupported`, `lora_not_found`)."""
    if len(choice) > MAX_ADAPTERS:
        raise InvalidRequest(param, f"{len(choice)} LoRA adapters; at most {MAX_ADAPTERS} per request")
    for name, scale in choice:
        if not name:
            raise InvalidRequest(param, "a LoRA adapter needs a name")
        if not _number(scale) or abs(scale) > MAX_LORA_SCALE:  # type: ignore[arg-type]
            shown = f"{scale:g}" if isinstance(scale, int | float) else repr(scale)
            raise InvalidRequest(param, f"adapter '{name}': scale {shown} is outside "
                                 f"[{-MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}]")


def lora_unsupported(model: str, param: str = "lora") -> InvalidRequest:
    return InvalidRequest(param, f"model '{model}' was exported without LoRA support; export it with "
                          "`python -m export … --lora-rank R` to use adapters")


def lora_not_found(model: str, name: str, available: Sequence[str], param: str = "lora") -> InvalidRequest:
    return InvalidRequest(param, f"no LoRA adapter '{name}' for model '{model}'; available: "
                          f"{', '.join(available) or 'none'}", code="lora_not_found")


def check_controlnets(units: Sequence[ControlUnit], param: str = "controlnet") -> None:
    """A request's ControlNet units: how many, and each one's scale, window and preprocessor (which ControlNets
    a model offers is the model's to say: `controlnet_unsupported`, `controlnet_not_found`). Each message
    names the unit and its field: `controlnet[1].scale`."""
    if len(units) > MAX_CONTROLNETS:
        raise InvalidRequest(param, f"{len(units)} ControlNet units; at most {MAX_CONTROLNETS} per request")
    for i, unit in enumerate(units):
        where = f"{param}[{i}]"
        if not unit.name or not isinstance(unit.name, str):
            raise InvalidRequest(param, f"{where}.model: a ControlNet unit needs a ControlNet's name")
        if not _number(unit.scale) or not 0.0 <= unit.scale <= MAX_CONTROLNET_SCALE:
            raise InvalidRequest(param, f"{where}.scale must be a number from 0 to {MAX_CONTROLNET_SCALE:g}")
        for field, value in (("start", unit.start), ("end", unit.end)):
            if not _number(value) or not 0.0 <= value <= 1.0:
                raise InvalidRequest(param, f"{where}.{field} must be a fraction of the schedule from 0 to 1")
        if unit.start >= unit.end:
            raise InvalidRequest(param, f"{where}: start ({unit.start:g}) must be below end ({unit.end:g})")
        if unit.preprocess not in PREPROCESSORS:
            raise InvalidRequest(param, f"{where}.preprocess must be one of: {', '.join(PREPROCESSORS)}")
        for field, value in (("low", unit.low), ("high", unit.high)):
            if not _number(value) or not 0.0 <= value <= MAX_CANNY_THRESHOLD:
                raise InvalidRequest(param, f"{where}.{field} (a canny threshold) must be a number from 0 to "
                                     f"{MAX_CANNY_THRESHOLD:g}")


def controlnet_unsupported(model: str, param: str = "controlnet") -> InvalidRequest:
    return InvalidRequest(param, f"model '{model}' was exported without ControlNet inputs; export it again with "
                          "`python -m export … --controlnet` (then `python -m export controlnet SOURCE --for "
                          "MODEL_DIR`) to use ControlNets", code="controlnet_unsupported")


def controlnet_not_found(model: str, name: str, available: Sequence[str], param: str = "controlnet") -> InvalidRequest:
    return InvalidRequest(param, f"no ControlNet '{name}' for model '{model}'; available: "
                          f"{', '.join(available) or 'none'}", code="controlnet_not_found")


# -- what a request costs ----------------------------------------------------------------------------


def guided(guidance: float) -> bool:
    """Whether the UNet also sees the negative prompt (classifier-free guidance)."""
    return guidance > GUIDED_ABOVE


def rows_per_image(guidance: float) -> int:
    """UNet rows per image and step: the negative and the positive prompt when guided."""
    return 2 if guided(guidance) else 1


def kept_steps(steps: int, strength: float) -> int:
    """How many of a `steps`-step schedule an image input runs: diffusers' img2img `get_timesteps` keeps
    the last int(steps · strength) (none at a low strength; see `schedule_steps`)."""
    return min(int(steps * strength), steps)


def schedule_steps(steps: int, strength: float) -> int:
    """The schedule's length: `steps`, lengthened at a low strength until one step is kept, so that every
    request runs at least one step (strength 0.1 of 2 steps: a 10-step schedule, of which 1 runs)."""
    if kept_steps(steps, strength) >= 1:
        return steps
    if strength * LONGEST_SCHEDULE < 1:
        raise InvalidRequest("strength", f"strength {strength:g} is too low to run one step; the lowest is "
                             f"{1 / LONGEST_SCHEDULE:g}")
    longer = max(steps, math.ceil(1 / strength))
    while kept_steps(longer, strength) < 1:  # float rounding may need one more
        longer += 1
    return longer


def steps_run(steps: int, strength: float = 1.0) -> int:
    """UNet calls per image for `steps` at `strength` (1.0 without an image): int(steps · strength), at least 1
    (InvalidRequest where strength is too low for one: `schedule_steps`)."""
    return kept_steps(schedule_steps(steps, strength), strength)


def default_strength(mask: bool, variation: bool = False) -> float:
    """The strength of a request that sets none: an inpainting mask repaints its area from noise (1.0, as
    diffusers' inpainting pipeline), an image alone keeps its composition (0.75), a variation keeps more
    of it (0.6)."""
    if mask:
        return 1.0
    return 0.6 if variation else 0.75
