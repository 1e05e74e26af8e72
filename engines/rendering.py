"""A render in progress: what `Pipeline.begin` prepares, `Pipeline.step` advances one UNet step at a time,
and `result` hands back.

A render alone steps until it finishes (`Pipeline.render`); a server's batcher steps several renders of
one model together, one UNet call per step over all their rows (`Pipeline.batch_key` says which may
share a call). Everything a render needs between steps lives here, per render: its own sampler history,
seeds, step count, inpainting inputs, LoRA feeds and callbacks, so that sharing a call changes nothing
but the call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from engines import images, schedulers
from engines.errors import EngineError, EngineFailure
from engines.lora import Chosen
from engines.noise import Noise, SeededNoise
from engines.progress import StepHook
from engines.render import RenderRequest, RenderResult, Timings

log = logging.getLogger("sdserve.engines")


@dataclass(frozen=True)
class Job:
    """A request with every value resolved against the model: what the stages consume."""

    request: RenderRequest
    width: int
    height: int
    steps: int  # schedule length (raised so that at least one step runs at low strength)
    guided: bool  # classifier-free guidance: the UNet also sees the negative prompt
    scheduler: schedulers.Scheduler
    seeds: list[int]
    strength: float  # 1.0 unless an image is given
    image: np.ndarray | None  # (1, 3, H, W) in [-1, 1]
    mask: np.ndarray | None  # (1, 1, H, W), 1 = repaint

    @property
    def copies(self) -> int:
        """UNet rows per image: the negative and the positive prompt when guided."""
        return 2 if self.guided else 1


@dataclass(frozen=True)
class Prompt:
    """Conditioning for the UNet, negative first when guided (the order of the doubled batch)."""

    embeds: np.ndarray  # (1 or 2, tokens, width)
    pooled: np.ndarray | None  # SDXL: (1 or 2, projection)


@dataclass(frozen=True)
class Inpainting:
    mask: np.ndarray  # (1, 1, h, w) at latent size
    masked_image_latents: np.ndarray | None  # 9-channel UNets: (images, 4, h, w)
    image_latents: np.ndarray | None  # 4-channel UNets blend these back outside the mask every step
    noise: np.ndarray  # the starting noise, reused to noise image_latents to each step's level


@dataclass(eq=False)
class Chunk:
    """At most `max_batch` images of a render, between their first and last UNet step."""

    images: slice  # which of the request's images
    draws: SeededNoise
    x: np.ndarray  # the latents, (images, C, h, w)
    inpainting: Inpainting | None
    conditioning: dict[str, np.ndarray]  # the UNet's text (and SDXL size) inputs, one row per UNet row
    mask_input: np.ndarray | None  # 9-channel UNets: mask and masked-image latents, one row per UNet row
    step: int = 0  # the next step's index in the schedule
    previous: schedulers.StepOutput | None = None  # the sampler's history
    drawn: int = 0  # step noise arrays drawn so far


@dataclass(eq=False)
class Rendering:
    """One request between `Pipeline.begin` and `result`: its stages' outputs and its current chunk."""

    job: Job
    prompt: Prompt
    schedule: schedulers.Schedule
    lora: Chosen
    hook: StepHook
    timings: Timings
    latents: np.ndarray | None  # the caller's starting noise, if given
    noise: Noise | None  # the caller's other draws, if given
    started: float = field(default_factory=time.perf_counter)
    chunk: Chunk | None = None  # None once every chunk is decoded
    pixels: list[np.ndarray] = field(default_factory=list)  # decoded chunks
    error: EngineError | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or self.chunk is None

    @property
    def denoised(self) -> bool:
        """The current chunk took its last step: it waits for its decode (`Pipeline.finish_chunks`)."""
        return self.chunk is not None and self.error is None and self.chunk.step == len(self.schedule.timesteps)

    @property
    def rows(self) -> int:
        """UNet rows of the current chunk's next call."""
        return 0 if self.chunk is None else self.chunk.x.shape[0] * self.job.copies

    def fail(self, exc: Exception) -> None:
        """Keep `exc` as this render's outcome (call it inside the `except` block: it logs our own faults)."""
        self.error = as_engine_error(exc)
        self.chunk = None

    def result(self) -> RenderResult:
        if self.error is not None:
            raise self.error
        pixels = np.concatenate(self.pixels)
        return RenderResult(images=images.to_pil(pixels), seeds=self.job.seeds, timings=self.timings,
                            pixels=pixels, steps_run=len(self.schedule.timesteps))


def as_engine_error(exc: Exception) -> EngineError:
    """Our errors as they are; a numpy or backend error is our fault, never the caller's: logged, wrapped."""
    if isinstance(exc, EngineError):
        return exc
    log.exception("render failed")
    failure = EngineFailure(f"render failed: {type(exc).__name__}: {exc}")
    failure.__cause__ = exc
    return failure

