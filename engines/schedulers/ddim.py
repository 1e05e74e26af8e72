"""DDIM (Song et al. 2020) with η = 0, as diffusers' DDIMScheduler: deterministic, no step noise."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

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
    check_timesteps,
    frozen,
    parse_config,
    predict_x0,
    refuse,
    require,
    spaced_timesteps,
    start_index,
)


class DDIMConfig(BetaConfig, kw_only=True):
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    thresholding: bool = False
    timestep_spacing: str = "leading"


class DDIM(Scheduler):
    def __init__(self, config: Mapping[str, Any], name: str = "ddim") -> None:
        self.name = name
        self.config = c = parse_config(DDIMConfig, config, name)
        require(name, "prediction_type", c.prediction_type, ("epsilon", "v_prediction", "sample"))
        if c.thresholding:
            refuse(name, "thresholding", c.thresholding)
        self.alphas_cumprod = alphas_cumprod(c, name, terminal_fix=False)
        self.final_alpha = F32(1.0) if c.set_alpha_to_one else self.alphas_cumprod[0]

    def schedule(self, steps: int, strength: float = 1.0) -> AlphaSchedule:
        """Each step lands `num_train_timesteps // steps` below its timestep whatever the spacing (a
        diffusers quirk kept for parity: with "trailing" that is not always the next timestep); below
        zero it lands on the final ᾱ (1, or ᾱ₀ without `set_alpha_to_one`)."""
        c = self.config
        steps = check_steps(steps, c.num_train_timesteps)
        timesteps = spaced_timesteps(c, steps, round_linspace=True).astype(np.int64)
        check_timesteps(timesteps, c.num_train_timesteps)
        timesteps = timesteps[start_index(steps, strength, len(timesteps)):]
        landing = timesteps - c.num_train_timesteps // steps
        alphas_prev = np.where(landing >= 0, self.alphas_cumprod[np.maximum(landing, 0)], self.final_alpha)
        return AlphaSchedule(timesteps=frozen(timesteps), init_noise_sigma=1.0,
                             alphas=frozen(self.alphas_cumprod[timesteps]), alphas_prev=frozen(alphas_prev.astype(F32)))

    def step(self, schedule: Schedule, i: int, model_output: np.ndarray, sample: np.ndarray,
             previous: StepOutput | None = None, noise: np.ndarray | None = None) -> StepOutput:
        alphas, alphas_prev = alphas_of(schedule)
        alpha, alpha_prev = alphas[i], alphas_prev[i]
        c = self.config
        x0 = predict_x0(c.prediction_type, model_output, sample, alpha)
        if c.prediction_type == "epsilon":
            epsilon = model_output
        elif c.prediction_type == "v_prediction":
            epsilon = np.sqrt(alpha) * model_output + np.sqrt(F32(1) - alpha) * sample
        else:
            epsilon = (sample - np.sqrt(alpha) * x0) / np.sqrt(F32(1) - alpha)
        if c.clip_sample:
            x0 = np.clip(x0, -c.clip_sample_range, c.clip_sample_range)
        prev_sample = np.sqrt(alpha_prev) * x0 + np.sqrt(F32(1) - alpha_prev) * epsilon
        return StepOutput(prev_sample=prev_sample, denoised=x0)

    def add_noise(self, schedule: Schedule, i: int, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return alpha_add_noise(schedule, i, original, noise)
