"""Latent consistency models (Luo et al. 2023), as diffusers' LCMScheduler: each step predicts x0 with
the consistency boundary condition, then re-noises it to the next timestep with fresh noise."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from engines.errors import InvalidRequest, ModelInvalid
from engines.schedulers.base import (
    F32,
    AlphaSchedule,
    BetaConfig,
    Schedule,
    Scheduler,
    StepOutput,
    alpha_add_noise,
    alphas_cumprod,
    alphas_of,
    check_steps,
    frozen,
    parse_config,
    predict_x0,
    refuse,
    require,
    start_index,
)


class LCMConfig(BetaConfig, kw_only=True):
    """LCMScheduler's defaults differ from the others' (scaled-linear SD betas). `timestep_spacing` and
    `steps_offset` are accepted but, as in diffusers, play no part in LCM's schedule."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    timestep_spacing: str = "leading"
    original_inference_steps: int = 50
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    thresholding: bool = False
    timestep_scaling: float = 10.0


class LCM(Scheduler):
    """Noise is needed at every step but the last, which returns the denoised sample itself: diffusers
    draws nothing there (see `draws_noise`), and `noise` is then ignored and may be None.
    `StepOutput.denoised` is LCM's boundary-conditioned estimate c_skip·x + c_out·x0, the value
    diffusers calls `denoised`."""

    needs_step_noise = True

    def __init__(self, config: Mapping[str, Any], name: str = "lcm") -> None:
        self.name = name
        self.config = c = parse_config(LCMConfig, config, name)
        require(name, "prediction_type", c.prediction_type, ("epsilon", "v_prediction", "sample"))
        if c.thresholding:
            refuse(name, "thresholding", c.thresholding)
        if not 1 <= c.original_inference_steps <= c.num_train_timesteps:
            raise ModelInvalid(f"scheduler config: original_inference_steps={c.original_inference_steps} must be "
                               f"from 1 to num_train_timesteps={c.num_train_timesteps}")
        self.alphas_cumprod = alphas_cumprod(c, name, terminal_fix=False)

    def schedule(self, steps: int, strength: float = 1.0) -> AlphaSchedule:
        """`steps` evenly chosen (floored) from the distillation schedule of `original_inference_steps`
        timesteps k-1, 2k-1, …; each step lands on the next timestep of this full schedule."""
        c = self.config
        original = c.original_inference_steps
        steps = check_steps(steps, c.num_train_timesteps)
        if steps > original:
            raise InvalidRequest("steps", f"this model's LCM schedule allows at most {original} steps")
        k = c.num_train_timesteps // original
        origin = (np.arange(1, original + 1) * k - 1)[::-1]
        timesteps = origin[np.floor(np.linspace(0, original, num=steps, endpoint=False)).astype(np.int64)]
        alphas = self.alphas_cumprod[timesteps]
        alphas_prev = np.append(alphas[1:], alphas[-1])  # the last step lands on its own ᾱ, and ignores it
        start = start_index(steps, strength, len(timesteps))
        return AlphaSchedule(timesteps=frozen(timesteps[start:].astype(np.int64)), init_noise_sigma=1.0,
                             alphas=frozen(alphas[start:]), alphas_prev=frozen(alphas_prev[start:]))

    def draws_noise(self, schedule: Schedule, i: int) -> bool:
        return i < len(schedule.timesteps) - 1

    def step(self, schedule: Schedule, i: int, model_output: np.ndarray, sample: np.ndarray,
             previous: StepOutput | None = None, noise: np.ndarray | None = None) -> StepOutput:
        alphas, alphas_prev = alphas_of(schedule)
        c = self.config
        scaled = F32(schedule.timesteps[i]) * F32(c.timestep_scaling)
        c_skip = F32(0.25) / (scaled * scaled + F32(0.25))
        c_out = scaled / np.sqrt(scaled * scaled + F32(0.25))
        x0 = predict_x0(c.prediction_type, model_output, sample, alphas[i])
        if c.clip_sample:
            x0 = np.clip(x0, -c.clip_sample_range, c.clip_sample_range)
        denoised = c_out * x0 + c_skip * sample
        if not self.draws_noise(schedule, i):
            return StepOutput(prev_sample=denoised, denoised=denoised)
        if noise is None:
            raise ValueError(f"{self.name} needs fresh noise at every step but the last")
        alpha_prev = alphas_prev[i]
        prev_sample = np.sqrt(alpha_prev) * denoised + np.sqrt(F32(1) - alpha_prev) * noise
        return StepOutput(prev_sample=prev_sample, denoised=denoised)

    def add_noise(self, schedule: Schedule, i: int, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return alpha_add_noise(schedule, i, original, noise)
