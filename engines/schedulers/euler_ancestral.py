"""Euler ancestral (k-diffusion's `sample_euler_ancestral`), as diffusers' EulerAncestralDiscreteScheduler:
an Euler step down to σ_down, then fresh noise back up to σ_next."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from engines.schedulers.base import (
    BetaConfig,
    Schedule,
    SigmaSchedule,
    StepOutput,
    alphas_cumprod,
    parse_config,
    require,
    sigma_table,
    sigmas_of,
)
from engines.schedulers.euler import SigmaScheduler, euler_x0, sigma_schedule


class EulerAncestralConfig(BetaConfig, kw_only=True):
    """No Karras σ, no final-σ choice: diffusers' ancestral class has neither, so an Euler config's
    `use_karras_sigmas` is ignored here exactly as `from_config` ignores it."""


class EulerAncestral(SigmaScheduler):
    """Needs noise at every step, the last included: diffusers draws it there too (times σ_up = 0), so
    a caller keeping its generator streams aligned with diffusers must draw it as well."""

    needs_step_noise = True

    def __init__(self, config: Mapping[str, Any], name: str = "euler_a") -> None:
        self.name = name
        self.config = parse_config(EulerAncestralConfig, config, name)
        require(name, "prediction_type", self.config.prediction_type, ("epsilon", "v_prediction"))
        self.sigmas = sigma_table(alphas_cumprod(self.config, name, terminal_fix=True))

    def schedule(self, steps: int, strength: float = 1.0) -> SigmaSchedule:
        return sigma_schedule(self.config, self.sigmas, steps, strength)

    def step(self, schedule: Schedule, i: int, model_output: np.ndarray, sample: np.ndarray,
             previous: StepOutput | None = None, noise: np.ndarray | None = None) -> StepOutput:
        if noise is None:
            raise ValueError(f"{self.name} needs fresh noise at every step")
        sigmas = sigmas_of(schedule)
        sigma, sigma_to = sigmas[i], sigmas[i + 1]
        x0 = euler_x0(self.config.prediction_type, model_output, sample, sigma)
        sigma_up = np.sqrt(sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma))
        sigma_down = np.sqrt(sigma_to * sigma_to - sigma_up * sigma_up)
        derivative = (sample - x0) / sigma
        prev_sample = sample + derivative * (sigma_down - sigma)
        return StepOutput(prev_sample=prev_sample + noise * sigma_up, denoised=x0)


