"""Euler (Karras et al. 2022, algorithm 2 without churn), as diffusers' EulerDiscreteScheduler."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from engines.schedulers.base import (
    F32,
    BetaConfig,
    Schedule,
    Scheduler,
    SigmaSchedule,
    StepOutput,
    alphas_cumprod,
    check_steps,
    frozen,
    karras_sigmas,
    parse_config,
    refuse,
    require,
    sigma_table,
    sigma_to_t,
    sigmas_of,
    spaced_timesteps,
    start_index,
)


class EulerConfig(BetaConfig, kw_only=True):
    interpolation_type: str = "linear"
    use_karras_sigmas: bool | None = False
    use_exponential_sigmas: bool | None = False
    use_beta_sigmas: bool | None = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"


def sigma_schedule(config: BetaConfig, sigmas_train: np.ndarray, steps: int, strength: float, *,
                   karras: bool = False, sigma_min: float | None = None, sigma_max: float | None = None,
                   final_sigma: np.float32 | int = 0) -> SigmaSchedule:
    """The Euler family's `set_timesteps`: σ interpolated linearly at the spaced timesteps (or Karras
    σ mapped back to fractional timesteps), then the final σ. The starting noise scale is the full
    schedule's largest σ, lifted to √(σ²+1) for "leading" spacing, whose first timestep is not the last
    training one — diffusers computes it before any img2img truncation."""
    steps = check_steps(steps, config.num_train_timesteps)
    timesteps = spaced_timesteps(config, steps, round_linspace=False).astype(F32)
    sigmas = np.interp(timesteps, np.arange(0, len(sigmas_train)), sigmas_train)
    if karras:
        log_sigmas = np.log(sigmas_train)
        sigmas = karras_sigmas(sigmas[0].item(), sigmas[-1].item(), steps, sigma_min, sigma_max)
        timesteps = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas]).astype(F32)
    sigmas = np.concatenate([sigmas, [final_sigma]]).astype(F32)
    largest = sigmas.max()
    init = largest if config.timestep_spacing in ("linspace", "trailing") else np.sqrt(largest * largest + F32(1))
    start = start_index(steps, strength, len(timesteps))
    return SigmaSchedule(timesteps=frozen(timesteps[start:]), init_noise_sigma=float(init),
                         sigmas=frozen(sigmas[start:]))


def euler_x0(prediction_type: str, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
    """x0 in the σ-parametrisation (x = x0 + σ·ε); v-prediction is defined on the unscaled sample."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / np.sqrt(sigma * sigma + F32(1))) + sample / (sigma * sigma + F32(1))
    return model_output


class SigmaScheduler(Scheduler):
    """Input scaling and noising shared by the σ-stepping samplers."""

    def scale_model_input(self, schedule: Schedule, i: int, sample: np.ndarray) -> np.ndarray:
        sigma = sigmas_of(schedule)[i]
        return sample / np.sqrt(sigma * sigma + F32(1))

    def add_noise(self, schedule: Schedule, i: int, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """x0 + σᵢ·ε. diffusers looks σ up by its step index once a begin index is set (always, in the
        img2img and inpainting pipelines): before the loop that is step 0, and after step i it is i+1 —
        the level of `timesteps[i+1]`, the very timestep the inpainting pipelines pass."""
        return original + noise * sigmas_of(schedule)[i]


class Euler(SigmaScheduler):
    def __init__(self, config: Mapping[str, Any], name: str = "euler") -> None:
        self.name = name
        self.config = parse_config(EulerConfig, config, name)
        c = self.config
        require(name, "prediction_type", c.prediction_type, ("epsilon", "v_prediction", "sample", "original_sample"))
        require(name, "interpolation_type", c.interpolation_type, ("linear",))
        require(name, "final_sigmas_type", c.final_sigmas_type, ("zero", "sigma_min"))
        if c.use_exponential_sigmas:
            refuse(name, "use_exponential_sigmas", c.use_exponential_sigmas)
        if c.use_beta_sigmas:
            refuse(name, "use_beta_sigmas", c.use_beta_sigmas)
        if c.timestep_type == "continuous" and c.prediction_type == "v_prediction":
            refuse(name, "timestep_type", c.timestep_type)
        self.alphas_cumprod = alphas_cumprod(c, name, terminal_fix=True)
        self.sigmas = sigma_table(self.alphas_cumprod)
        first = self.alphas_cumprod[0]
        self.final_sigma = np.sqrt((F32(1) - first) / first) if c.final_sigmas_type == "sigma_min" else 0

    def schedule(self, steps: int, strength: float = 1.0) -> SigmaSchedule:
        c = self.config
        return sigma_schedule(c, self.sigmas, steps, strength, karras=bool(c.use_karras_sigmas),
                              sigma_min=c.sigma_min, sigma_max=c.sigma_max, final_sigma=self.final_sigma)

    def step(self, schedule: Schedule, i: int, model_output: np.ndarray, sample: np.ndarray,
             previous: StepOutput | None = None, noise: np.ndarray | None = None) -> StepOutput:
        sigmas = sigmas_of(schedule)
        sigma = sigmas[i]
        x0 = euler_x0(self.config.prediction_type, model_output, sample, sigma)
        derivative = (sample - x0) / sigma
        return StepOutput(prev_sample=sample + derivative * (sigmas[i + 1] - sigma), denoised=x0)
