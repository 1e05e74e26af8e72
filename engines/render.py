"""What a render takes and what it gives back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np


@dataclass(frozen=True)
class Tokens:
    """A request's prompt and negative prompt, tokenized once by each of one model's tokenizers
    (`Pipeline.tokenize`, which also checks their length): a server counts them before queueing and hands
    them to the render in `RenderRequest.tokens`, so that no text is tokenized twice."""

    model: str  # the model whose tokenizers made them
    prompt: str
    negative_prompt: str | None
    ids: dict[str, tuple[list[int], list[int]]]  # tokenizer → (prompt ids, negative prompt ids), no specials

    @property
    def count(self) -> int:
        """Prompt and negative prompt tokens by the first tokenizer (the usage a response reports)."""
        prompt, negative = next(iter(self.ids.values()), ([], []))
        return len(prompt) + len(negative)


class ControlUnit(msgspec.Struct, kw_only=True, frozen=True):
    """One ControlNet guiding a render, as diffusers' ControlNet pipelines take it: `name` one of the model's
    ControlNets (`Pipeline.info.controlnets`), `image` (PIL) its control image, fitted to the render size as
    uploads are and with `preprocess` "canny" turned into its edge map (thresholds `low`, `high`); `scale`
    (0–2) is `controlnet_conditioning_scale`, `start`/`end` `control_guidance_start/end`: the unit guides
    step i of a schedule of n when start ≤ i/n and (i+1)/n ≤ end. Bounds: `engines.limits`."""

    name: str
    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str = "none"  # `limits.PREPROCESSORS`
    low: float = 100.0  # canny's thresholds (`limits.CANNY_THRESHOLDS`)
    high: float = 200.0


class RenderRequest(msgspec.Struct, kw_only=True):
    """One call into a pipeline. `image` (PIL) turns it into image to image; `image` + `mask` (PIL,
    white = repaint) into inpainting. `seed` None draws a random one; image i uses seed + i. Size,
    steps, guidance and sampler left None take the model's defaults (`Pipeline.info.defaults`), strength
    `limits.default_strength`. `lora` applies adapters as diffusers' `set_adapters(names, scales)` does.
    `tokens`: the prompts already tokenized by `Pipeline.tokenize` (else the render tokenizes them).
    `controlnet`: ControlNet units (`ControlUnit`), their residuals added up as diffusers' MultiControlNet does.
    `decoder` "tiny" decodes with the model's tiny decoder (TAESD: faster, less faithful) instead of the VAE."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    seed: int | None = None
    n: int = 1
    image: Any = None
    mask: Any = None
    strength: float | None = None  # None: 1.0 with a mask, 0.75 without (`limits.default_strength`)
    lora: list[tuple[str, float]] = []  # LoRA adapters (name, scale) from the pipeline's `adapters`
    controlnet: list[ControlUnit] = []  # at most `limits.MAX_CONTROLNETS`
    tokens: Tokens | None = None
    decoder: str = "full"  # the final image's decoder: "full" (the VAE) or "tiny" (the model's TAESD, if exported)


class Timings(msgspec.Struct):
    """Seconds per stage (text_encoder, vae_encoder, unet, vae_decoder, total) and per UNet step."""

    stages: dict[str, float] = msgspec.field(default_factory=dict)
    steps: list[float] = msgspec.field(default_factory=list)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - started


class RenderResult(msgspec.Struct):
    images: list[Any]  # PIL.Image.Image, one per requested image
    seeds: list[int]  # the seed that reproduces each image alone
    timings: Timings
    pixels: np.ndarray  # (n, H, W, 3) float32 in [0, 1], before 8-bit rounding
    steps_run: int  # UNet calls per image (fewer than `steps` for image to image)
