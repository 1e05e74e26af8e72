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
from engines.job import Job
from engines.lora import Chosen
from engines.noise import Noise, SeededNoise
from engines.progress import StepHook
from engines.render import RenderResult, Timings

log = logging.getLogger("sdserve.engines")


@dataclass(frozen=True)
class Prompt:
    """Conditioning for the UNet, negative first when guided (the order of the doubled batch)."""

    embeds: np.ndarray  # (1 or 2, tokens, width)
    pooled: np.ndarray | None  # SDXL: (1 or 2, projection)


@dataclass(frozen=True)
class Blend:
    """Inpainting with a plain UNet: after every step, the area outside the mask is reset to the image."""

    mask: np.ndarray  # (1, 1, h, w) at latent size, 1 = repaint
    image_latents: np.ndarray  # (images, C, h, w)
    noise: np.ndarray  # the starting noise, which noises image_latents to each step's level

    def apply(self, scheduler: schedulers.Scheduler, schedule: schedulers.Schedule, i: int, x: np.ndarray
              ) -> np.ndarray:
        """After step i: the image's latents noised to the next step's level outside the mask, x inside."""
        known = self.image_latents
        if i + 1 < len(schedule.timesteps):
            known = scheduler.add_noise(schedule, i + 1, known, self.noise)
        return ((1.0 - self.mask) * known + self.mask * x).astype(np.float32)


@dataclass(eq=False)
class Chunk:
    """At most `max_batch` images of a render, between their first and last UNet step."""

    images: slice  # which of the request's images
    draws: SeededNoise
    x: np.ndarray  # the latents, (images, C, h, w)
    conditioning: dict[str, np.ndarray]  # the UNet's text (and SDXL size) inputs, one row per UNet row
    mask_input: np.ndarray | None  # 9-channel UNets: mask and masked-image latents, one row per UNet row
    blend: Blend | None  # inpainting with a plain UNet
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
    def progress(self) -> tuple[int, int]:
        """(steps done, steps) of the current chunk: what `on_step` last reported."""
        return (0 if self.chunk is None else self.chunk.step), len(self.schedule.timesteps)

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

