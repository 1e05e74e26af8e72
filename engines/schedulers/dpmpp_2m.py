"""DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler with
algorithm_type="dpmsolver++", solver_order=2: a multistep solver in λ = log(α/σ) that extrapolates
the x0 estimate from the previous step's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
    check_timesteps,
    frozen,
    karras_sigmas,
    parse_config,
    refuse,
    require,
    sigma_table,
    sigma_to_t,
    sigmas_of,
    start_index,
)


class DPMConfig(BetaConfig, kw_only=True):
    """`algorithm_type`, `solver_order` and `use_karras_sigmas` are not read: the sampler name fixes them.
    `sigma_min`/`sigma_max` are not DPMSolverMultistepScheduler arguments, but `from_config` keeps a
    foreign config's keys on the scheduler's config and its Karras spacing reads them from there, so an
    Euler config's σ bounds reach DPM++ Karras in diffusers too."""

    thresholding: bool = False
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_exponential_sigmas: bool | None = False
    use_beta_sigmas: bool | None = False
    use_lu_lambdas: bool | None = False
    use_flow_sigmas: bool | None = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None


@dataclass(frozen=True)
class DPMSchedule(SigmaSchedule):
    first_order_final: bool
    """Whether the last step is first order — decided on the full schedule's length, as diffusers does."""


def _log(x: np.float32) -> np.float32:
    """float32 log rounded from float64: torch's scalar log differs from numpy's float32 SIMD log by an
    ulp more often than from this, and λ differences cancel into h."""
    with np.errstate(divide="ignore"):
        return F32(np.log(np.float64(x)))


def _exp(x: np.float32) -> np.float32:
    return F32(np.exp(np.float64(x)))


def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    alpha = F32(1) / np.sqrt(sigma * sigma + F32(1))
    return alpha, sigma * alpha


def _lambda(sigma: np.float32) -> tuple[np.float32, np.float32, np.float32]:
    alpha, sigma_t = _alpha_sigma(sigma)
    return alpha, sigma_t, _log(alpha) - _log(sigma_t)


class DPMSolverPP2M(Scheduler):
    """Deterministic. The first step of every render (img2img included) is first order, and so is the
    last whenever the final σ is 0 (the default) or the full schedule has fewer than 15 steps."""

    def __init__(self, config: Mapping[str, Any], name: str = "dpmpp_2m", karras: bool = False) -> None:
        self.name, self.karras = name, karras
        self.config = c = parse_config(DPMConfig, config, name)
        require(name, "prediction_type", c.prediction_type, ("epsilon", "v_prediction", "sample"))
        require(name, "final_sigmas_type", c.final_sigmas_type, ("zero", "sigma_min"))
        require(name, "solver_type", c.solver_type, ("midpoint", "heun", "logrho", "bh1", "bh2"))
        for key in ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"):
            if getattr(c, key):
                refuse(name, key, getattr(c, key))
        if c.variance_type in ("learned", "learned_range"):
            refuse(name, "variance_type", c.variance_type)
        self.heun = c.solver_type == "heun"  # logrho/bh1/bh2 (DEIS, UniPC configs) mean midpoint in diffusers
        self.alphas_cumprod = alphas_cumprod(c, name, terminal_fix=True)
        self.sigmas = sigma_table(self.alphas_cumprod)

    def _timesteps(self, steps: int) -> np.ndarray:
        """Spacings over steps + 1 points, dropping the last, and clipped at `lambda_min_clipped`: not
        the Euler/DDIM spacings."""
        c, n = self.config, self.config.num_train_timesteps
        lambdas = np.log(np.sqrt(self.alphas_cumprod)) - np.log(np.sqrt(F32(1) - self.alphas_cumprod))
        last = n - int(np.searchsorted(lambdas[::-1], c.lambda_min_clipped, side="left"))
        if c.timestep_spacing == "linspace":
            return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        if c.timestep_spacing == "leading":
            ratio = last // (steps + 1)
            return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + c.steps_offset
        return np.arange(last, 0, -n / steps).round().astype(np.int64) - 1

    def schedule(self, steps: int, strength: float = 1.0) -> DPMSchedule:
        c = self.config
        steps = check_steps(steps, c.num_train_timesteps)
        timesteps = self._timesteps(steps)
        if self.karras:
            log_sigmas = np.log(self.sigmas)
            sigmas = karras_sigmas(self.sigmas[-1].item(), self.sigmas[0].item(), steps, c.sigma_min, c.sigma_max)
            fractional = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
            timesteps = (fractional if c.beta_schedule == "squaredcos_cap_v2" else fractional.round()).astype(np.int64)
        else:
            check_timesteps(timesteps, c.num_train_timesteps)
            sigmas = np.interp(timesteps, np.arange(0, len(self.sigmas)), self.sigmas)
        final = self.sigmas[0] if c.final_sigmas_type == "sigma_min" else 0
        sigmas = np.concatenate([sigmas, [final]]).astype(F32)
        first_order_final = c.euler_at_final or (c.lower_order_final and len(timesteps) < 15) \
            or c.final_sigmas_type == "zero"
        start = start_index(steps, strength, len(timesteps))
        return DPMSchedule(timesteps=frozen(timesteps[start:]), init_noise_sigma=1.0, sigmas=frozen(sigmas[start:]),
                           first_order_final=bool(first_order_final))

    def _x0(self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
        prediction = self.config.prediction_type
        if prediction == "sample":
            return model_output
        alpha_t, sigma_t = _alpha_sigma(sigma)
        if prediction == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        return alpha_t * sample - sigma_t * model_output

    def add_noise(self, schedule: Schedule, i: int, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """α·x0 + σ·ε at step i's σ, indexed like Euler's (see there)."""
        alpha_t, sigma_t = _alpha_sigma(sigmas_of(schedule)[i])
        return alpha_t * original + sigma_t * noise

    def step(self, schedule: Schedule, i: int, model_output: np.ndarray, sample: np.ndarray,
             previous: StepOutput | None = None, noise: np.ndarray | None = None) -> StepOutput:
        """Second order from `previous.denoised` when there is one; first order at a render's first step
        (`previous` None) and at a first-order final step."""
        if not isinstance(schedule, DPMSchedule):
            raise TypeError(f"expected a DPMSchedule made by this scheduler, got {type(schedule).__name__}")
        sigmas = schedule.sigmas
        x0 = self._x0(model_output, sample, sigmas[i])
        alpha_t, sigma_t, lambda_t = _lambda(sigmas[i + 1])
        _, sigma_s0, lambda_s0 = _lambda(sigmas[i])
        h = lambda_t - lambda_s0
        decay = alpha_t * (_exp(-h) - F32(1.0))
        last = i == len(schedule.timesteps) - 1
        if previous is None or i == 0 or (last and schedule.first_order_final):
            return StepOutput(prev_sample=(sigma_t / sigma_s0) * sample - decay * x0, denoised=x0)
        lambda_s1 = _lambda(sigmas[i - 1])[2]
        r0 = (lambda_s0 - lambda_s1) / h
        d1 = (F32(1.0) / r0) * (x0 - previous.denoised)
        if self.heun:
            prev_sample = (sigma_t / sigma_s0) * sample - decay * x0 + \
                (alpha_t * ((_exp(-h) - F32(1.0)) / h + F32(1.0))) * d1
        else:
            prev_sample = (sigma_t / sigma_s0) * sample - decay * x0 - F32(0.5) * decay * d1
        return StepOutput(prev_sample=prev_sample, denoised=x0)
