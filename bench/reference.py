"""The PyTorch/diffusers reference: the pipeline a model directory was exported from, timed by stage.

Imports torch and diffusers (the `export` extra); `bench` imports this module only when a reference
run is asked for. The sampler table is the one definition of "the diffusers scheduler our sampler
name stands for", shared with the engines' parity tests.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import torch  # after the verbosity setting above: transformers reads it on import
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from engines import manifest as mf
from export import presets, source

_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}

SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {**_DPMPP_2M, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {**_DPMPP_2M, "use_karras_sigmas": True}),
    "lcm": (LCMScheduler, {}),
}


def diffusers_scheduler(sampler: str, config: Mapping[str, Any]) -> SchedulerMixin:
    """`Class.from_config(config, **overrides)`: the scheduler diffusers renders `sampler` with for a
    model whose scheduler_config.json is `config` (of whatever class)."""
    cls, overrides = SCHEDULERS[sampler]
    return cls.from_config(dict(config), **overrides)


class StageClock:
    """Seconds per stage of one diffusers call, as the engines count them: text encoders and VAE decode by
    wrapping their entry points; each denoising step from its UNet call to the end of its scheduler step
    (diffusers' `callback_on_step_end`), so a "UNet step" on both sides is the UNet plus the guidance mix
    and the sampler step. CUDA is synchronised at each mark, so GPU time lands in the stage that spent it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stages: dict[str, float] = {}
        self.steps: list[float] = []
        self._step_started: float | None = None

    def reset(self) -> None:
        self.stages, self.steps, self._step_started = {}, [], None

    def wrap(self, owner: object, attribute: str, stage: str) -> None:
        inner = getattr(owner, attribute)

        def timed(*args: object, **kwargs: object) -> object:
            self._sync()
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._sync()
                self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - started

        setattr(owner, attribute, timed)

    def wrap_unet(self, unet: torch.nn.Module) -> None:
        inner = unet.forward

        def marked(*args: object, **kwargs: object) -> object:
            if self._step_started is None:  # the first UNet call of a step starts it
                self._sync()
                self._step_started = time.perf_counter()
            return inner(*args, **kwargs)

        unet.forward = marked

    def step_end(self, _pipe: object, _index: int, _timestep: object, kwargs: dict[str, Any]) -> dict[str, Any]:
        """diffusers' `callback_on_step_end`: the step is over once the sampler has stepped."""
        self._sync()
        if self._step_started is not None:
            seconds = time.perf_counter() - self._step_started
            self.steps.append(seconds)
            self.stages["unet"] = self.stages.get("unet", 0.0) + seconds
        self._step_started = None
        return kwargs

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class Reference:
    """A diffusers pipeline on `device` in `dtype`, with our sampler names and stage timings."""

    def __init__(self, pipe: DiffusionPipeline, device: str, precision: mf.Precision) -> None:
        self.device = torch.device(device)
        # fp32 is how `export` loads every pipeline; casting again only makes diffusers warn
        self.pipe = pipe.to(self.device, torch.float16) if precision == "fp16" else pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = dict(self.pipe.scheduler.config)
        self.clock = StageClock(self.device)
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(self.pipe, name, None) is not None:
                self.clock.wrap(getattr(self.pipe, name), "forward", "text_encoder")
        self.clock.wrap_unet(self.pipe.unet)
        self.clock.wrap(self.pipe.vae, "decode", "vae_decoder")

    def render(self, prompt: str, width: int, height: int, steps: int, guidance_scale: float, sampler: str,
               latents: np.ndarray, bf16: bool = False) -> np.ndarray:
        """Images (n, H, W, 3) in [0, 1] from the starting noise `latents` (n, C, h, w); with `bf16`, under
        `torch.autocast` in bfloat16 (PyTorch's own mixed precision: matrix products and convolutions in
        bf16, normalizations and softmax in fp32)."""
        self.pipe.scheduler = diffusers_scheduler(sampler, self.scheduler_config)
        self.clock.reset()
        start = torch.from_numpy(latents).to(self.device, self.pipe.unet.dtype)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = self.pipe(prompt=prompt, negative_prompt=None, width=width, height=height, num_inference_steps=steps,
                            guidance_scale=guidance_scale, num_images_per_prompt=len(latents), latents=start,
                            output_type="np", generator=torch.Generator().manual_seed(0),
                            callback_on_step_end=self.clock.step_end)
        return np.asarray(out.images, dtype=np.float32)


def load(model_dir: Path, manifest: mf.Manifest, device: str, precision: mf.Precision,
         checkpoint: str | None = None) -> Reference:
    """The reference for a model directory: rebuilt from its manifest's source (random presets, local
    folders, hub ids), or from `checkpoint` (a folder, hub id or single file) when given."""
    preset = presets.get(manifest.name)
    pipe = (source.load(preset, checkpoint)[0] if checkpoint is not None
            else source.reference(manifest.source, manifest.name))
    return Reference(pipe, device, precision)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)

