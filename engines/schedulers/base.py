"""What every sampler shares: the schedule and step types, the noise tables diffusers derives from a
scheduler config, and the timestep spacings.

Parity with diffusers is the contract, so the tables are built the way diffusers builds them in PyTorch
on the CPU, not the way one would write them from the papers: betas from `torch.linspace` in float32
(which rounds once per element, as a fused multiply-add), `alphas_cumprod` accumulated in float64 and
stored as float32, and every later step in float32. A one-ulp difference in ᾱ moves σ_max by about
1e-6 relative, which the per-step comparisons in the tests would see.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import numpy as np

from engines import limits
from engines.errors import InvalidRequest, ModelInvalid

F32 = np.float32
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")


@dataclass(frozen=True)
class Schedule:
    """One render's schedule: immutable, so one `Scheduler` can serve concurrent renders.

    `timesteps` are exactly what diffusers passes to the UNet, after img2img truncation, in diffusers'
    dtype (float32 for the Euler family, int64 for the others); one UNet call per entry.
    """

    timesteps: np.ndarray
    init_noise_sigma: float


@dataclass(frozen=True)
class SigmaSchedule(Schedule):
    """Schedules that step in σ (Euler family, DPM-Solver++). `sigmas[i]` is the noise level of step i
    and `sigmas[i + 1]` the one it lands on; `sigmas[-1]` is the final level (usually 0). Truncation
    drops the leading entries together with the timesteps, which is what diffusers' begin index does."""

    sigmas: np.ndarray


@dataclass(frozen=True)
class AlphaSchedule(Schedule):
    """Schedules that step in ᾱ (DDIM, LCM): `alphas[i]` is ᾱ at `timesteps[i]`, `alphas_prev[i]` the ᾱ
    step i lands on, both float32 and looked up once here rather than per step."""

    alphas: np.ndarray
    alphas_prev: np.ndarray


@dataclass(frozen=True)
class StepOutput:
    prev_sample: np.ndarray
    """The sample for the next step; after the last step, the final latents."""
    denoised: np.ndarray
    """The x0 estimate of this step (DPM-Solver++ extrapolates from the previous one)."""


class Scheduler(ABC):
    """A sampler over one model's noise schedule. Holds only values derived from the config, never
    per-render state: the step index is explicit and the history travels in `previous`."""

    name: str
    needs_step_noise: bool = False

    @abstractmethod
    def schedule(self, steps: int, strength: float = 1.0) -> Schedule:
        """diffusers' `set_timesteps(steps)` followed by the img2img pipelines' `get_timesteps(steps,
        strength)`; strength 1 is the full text-to-image schedule."""

    def draws_noise(self, schedule: Schedule, i: int) -> bool:
        """Whether step i consumes `noise`: exactly the steps at which diffusers draws from its generator,
        so a caller replaying diffusers' draws (one per drawing step) must index them by this."""
        return self.needs_step_noise

    def scale_model_input(self, schedule: Schedule, i: int, sample: np.ndarray) -> np.ndarray:
        return sample

    @abstractmethod
    def step(self, schedule: Schedule, i: int, model_output: np.ndarray, sample: np.ndarray,
             previous: StepOutput | None = None, noise: np.ndarray | None = None) -> StepOutput:
        """Step `i` of `schedule`; `previous` is step i-1's output of the same render (None at i=0)."""

    @abstractmethod
    def add_noise(self, schedule: Schedule, i: int, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Noise clean latents to the level of step i, as the img2img pipelines do before the loop (i=0)
        and the inpainting pipelines do after step i-1 (diffusers' `add_noise(..., timesteps[i])`)."""


# -- configs -------------------------------------------------------------------------------------


class BetaConfig(msgspec.Struct, kw_only=True):
    """Keys common to the diffusers schedulers we mirror. Each sampler's subclass restates the
    defaults of its diffusers class, because `from_config` fills missing keys from the *target*
    class: the SD 1.5 PNDM config has no `timestep_spacing`, so Euler gets "linspace", DDIM "leading"."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list[float] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False


C = TypeVar("C", bound=BetaConfig)


def parse_config(kind: type[C], config: Mapping[str, Any], sampler: str) -> C:
    """The config as diffusers' `from_config` reads it: keys listed in `_use_default_values` take the
    target class's defaults, private and unknown keys are ignored."""
    if not isinstance(config, Mapping):
        raise ModelInvalid(f"scheduler config must be a JSON object, got {type(config).__name__}")
    listed = config.get("_use_default_values")
    defaults = set(listed) if isinstance(listed, list | tuple) else set()
    kept = {k: v for k, v in config.items() if isinstance(k, str) and not k.startswith("_") and k not in defaults}
    try:
        parsed = msgspec.convert(kept, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise ModelInvalid(f"scheduler config unusable for sampler {sampler!r}: {exc}") from exc
    if parsed.num_train_timesteps < 1:
        raise ModelInvalid(f"scheduler config: num_train_timesteps must be ≥ 1, got {parsed.num_train_timesteps}")
    require(sampler, "timestep_spacing", parsed.timestep_spacing, SPACINGS)
    return parsed


def require(sampler: str, key: str, value: object, allowed: tuple[object, ...]) -> None:
    if value not in allowed:
        raise ModelInvalid(f"sampler {sampler!r} cannot honour scheduler config {key}={value!r} "
                           f"(supported: {', '.join(map(repr, allowed))})")


def refuse(sampler: str, key: str, value: object) -> None:
    """A config value diffusers would honour and we do not: failing beats rendering something else."""
    raise ModelInvalid(f"sampler {sampler!r} does not support scheduler config {key}={value!r}")


# -- noise tables --------------------------------------------------------------------------------


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU, bit for bit: a float32
    step, then start + step·i for the first half and end - step·(steps-1-i) for the second, each
    rounded once (computed exactly in float64, since a float32 times a small integer is exact there)."""
    first, last = F32(start), F32(end)
    if steps == 1:
        return np.array([first], F32)
    step = np.float64((last - first) / F32(steps - 1))
    index = np.arange(steps, dtype=np.float64)
    values = np.where(index < steps // 2, np.float64(first) + step * index,
                      np.float64(last) - step * (steps - 1 - index))
    return values.astype(F32)


def _cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)], F32)


def cumprod(values: np.ndarray) -> np.ndarray:
    """torch's CPU cumprod accumulates float32 in float64 and rounds each partial product."""
    return np.cumprod(values.astype(np.float64)).astype(F32)


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' `rescale_zero_terminal_snr` (arXiv 2305.08891, algorithm 1), in its float32 order."""
    root = np.sqrt(cumprod(F32(1.0) - betas))
    first, final = root[0], root[-1]
    root = (root - final) * (first / (first - final))
    alphas_bar = root * root
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return F32(1) - alphas


def alphas_cumprod(config: BetaConfig, sampler: str, *, terminal_fix: bool) -> np.ndarray:
    """ᾱ per training timestep, float32. `terminal_fix`: the σ-based schedulers replace a zero
    terminal ᾱ (zero-SNR rescaling) by 2⁻²⁴ so that σ stays finite; DDIM and LCM keep the zero."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, F32)
        if betas.shape != (n,):
            raise ModelInvalid(f"scheduler config: trained_betas has {betas.size} values, "
                               f"num_train_timesteps is {n}")
    else:
        require(sampler, "beta_schedule", config.beta_schedule, BETA_SCHEDULES)
        if config.beta_schedule == "linear":
            betas = torch_linspace(config.beta_start, config.beta_end, n)
        elif config.beta_schedule == "scaled_linear":
            root = torch_linspace(config.beta_start**0.5, config.beta_end**0.5, n)
            betas = root * root
        else:
            betas = _cosine_betas(n)
    if config.rescale_betas_zero_snr:
        betas = _zero_terminal_snr(betas)
    table = cumprod(F32(1.0) - betas)
    if config.rescale_betas_zero_snr and terminal_fix:
        table[-1] = F32(2.0**-24)
    return frozen(table)


def sigma_table(alphas_bar: np.ndarray) -> np.ndarray:
    """σ = √((1-ᾱ)/ᾱ) per training timestep, float32."""
    return frozen(np.sqrt((F32(1) - alphas_bar) / alphas_bar))


def karras_sigmas(largest: float, smallest: float, steps: int, sigma_min: float | None,
                  sigma_max: float | None) -> np.ndarray:
    """Karras et al. (2022) ρ=7 spacing between σ_max and σ_min, float64 as in diffusers."""
    low = sigma_min if sigma_min is not None else smallest
    high = sigma_max if sigma_max is not None else largest
    rho = 7.0
    ramp = np.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = low ** (1 / rho), high ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """The fractional training timestep of σ, interpolating linearly in log σ (diffusers' `_sigma_to_t`,
    called once per σ as diffusers does, so that numpy takes the same code path)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    distances = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(distances >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    weight = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return float(((1 - weight) * low + weight * high).reshape(np.shape(sigma)))


# -- timesteps -----------------------------------------------------------------------------------


def check_steps(steps: object, limit: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or not 1 <= steps <= limit:
        raise InvalidRequest("steps", f"steps must be an integer from 1 to {limit}")
    return int(steps)


def spaced_timesteps(config: BetaConfig, steps: int, *, round_linspace: bool) -> np.ndarray:
    """Training timesteps for `steps` steps, descending; callers cast to their diffusers class's dtype.
    Euler keeps "linspace" fractional; DDIM rounds it."""
    n = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        values = np.linspace(0, n - 1, steps)
        return (values.round() if round_linspace else values)[::-1].copy()
    if config.timestep_spacing == "leading":
        return (np.arange(0, steps) * (n // steps)).round()[::-1] + config.steps_offset
    return np.arange(n, 0, -n / steps).round() - 1


def start_index(steps: int, strength: object, available: int) -> int:
    """The img2img pipelines' `get_timesteps`: how many leading entries a strength below 1 skips."""
    start = steps - limits.kept_steps(steps, limits.check_strength(strength))
    if start >= available:
        raise InvalidRequest("strength", f"strength {strength} leaves none of the {steps} steps to run; "
                             f"raise strength to at least {1 / steps:.3g} or use more steps")
    return start


def check_timesteps(timesteps: np.ndarray, limit: int) -> None:
    """Integer schedules index ᾱ by timestep; one outside the table (e.g. "leading" with steps_offset at
    the maximum step count) would fail deep inside diffusers, so refuse the step count up front."""
    if timesteps.size and (timesteps.min() < 0 or timesteps.max() >= limit):
        raise InvalidRequest("steps", f"this step count puts a timestep outside the model's 0..{limit - 1}")


def sigmas_of(schedule: Schedule) -> np.ndarray:
    if not isinstance(schedule, SigmaSchedule):
        raise TypeError(f"expected a SigmaSchedule made by this scheduler, got {type(schedule).__name__}")
    return schedule.sigmas


def alphas_of(schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(schedule, AlphaSchedule):
        raise TypeError(f"expected an AlphaSchedule made by this scheduler, got {type(schedule).__name__}")
    return schedule.alphas, schedule.alphas_prev


def frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


# -- shared steps --------------------------------------------------------------------------------


def alpha_add_noise(schedule: Schedule, i: int, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """√ᾱ·x0 + √(1-ᾱ)·ε at `timesteps[i]`, as DDIM's and LCM's `add_noise`."""
    alpha = alphas_of(schedule)[0][i]
    return np.sqrt(alpha) * original + np.sqrt(F32(1) - alpha) * noise


def predict_x0(prediction_type: str, model_output: np.ndarray, sample: np.ndarray,
               alpha: np.float32) -> np.ndarray:
    """x0 from an ε-, v- or x0-prediction at ᾱ = `alpha`, in DDIM's and LCM's float32 order."""
    if prediction_type == "epsilon":
        return (sample - np.sqrt(F32(1) - alpha) * model_output) / np.sqrt(alpha)
    if prediction_type == "v_prediction":
        return np.sqrt(alpha) * sample - np.sqrt(F32(1) - alpha) * model_output
    return model_output
