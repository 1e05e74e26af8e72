"""The numpy samplers against diffusers' schedulers, step by step.

Both run the same denoising loop over the same starting latents, the same step noise and a fake model
whose output depends on the sample it is given (0.3·x_in + a fixed draw), so an error in any step
feeds into the next ones. diffusers' step noise is supplied by replacing `randn_tensor` in the
reference scheduler modules, which also records which steps draw.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.schedulers import (
    scheduling_ddim,
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_euler_discrete,
    scheduling_lcm,
)

from bench.reference import diffusers_scheduler
from engines import schedulers
from engines.errors import InvalidRequest, ModelInvalid
from engines.schedulers import SAMPLERS, StepOutput

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # diffusers under numpy 2
    pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning"),  # see cosine_karras
]

# The real scheduler_config.json of each model family.
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "clip_sample": False, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
SD21 = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "clip_sample": False, "num_train_timesteps": 1000,
        "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None}
SDXL = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_start": 0.00085,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False, "interpolation_type": "linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
        "trained_betas": None, "use_karras_sigmas": False}
SD_TURBO = {**SDXL, "_diffusers_version": "0.24.0.dev0", "timestep_spacing": "trailing", "timestep_type": "discrete"}
MODELS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL, "sd_turbo": SD_TURBO}

# Settings the model families above leave alone, each of which changes the numbers somewhere.
_SCALED = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
EDGES = {
    "zero_snr": {"_class_name": "DDIMScheduler", "beta_schedule": "linear", "rescale_betas_zero_snr": True,
                 "timestep_spacing": "trailing", "prediction_type": "v_prediction", "clip_sample": False},
    # Euler ancestral turns this one into NaNs from the first step (σ_max ≈ 2e4 makes σ_down² < 0 in
    # float32): diffusers' behaviour, reproduced.
    "cosine_karras": {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "squaredcos_cap_v2",
                      "use_karras_sigmas": True, "steps_offset": 1, "sigma_max": 80.0},
    "trained_clip_x0": {"_class_name": "DDIMScheduler", "trained_betas": _SCALED.tolist(), "clip_sample": True,
                        "clip_sample_range": 1.5, "set_alpha_to_one": True, "prediction_type": "sample"},
    "final_sigma_min": {**SDXL, "final_sigmas_type": "sigma_min", "sigma_min": 0.05, "sigma_max": 10.0,
                        "solver_type": "heun", "lambda_min_clipped": -2.0, "timestep_spacing": "linspace"},
    # timestep_scaling 0.05 makes LCM's c_skip matter (at 10 it is below 1e-5 for every timestep)
    "listed_defaults": {**SD_TURBO, "_use_default_values": ["timestep_spacing", "steps_offset"],
                        "timestep_scaling": 0.05, "original_inference_steps": 40},
}

STEPS = (1, 2, 4, 13, 30)
STRENGTHS = (1.0, 0.6, 0.3)
SHAPE = (2, 4, 8, 8)
# Largest |ours - diffusers| allowed, relative to max(1, max |diffusers|) of the same array. Bit-exact parity
# is out of reach: torch's CPU sqrt/log/exp (MKL) are not correctly rounded (sqrt is off by one ulp for
# ~15% of inputs), so σ tables and per-step scalars differ by an ulp; the rest of each step is the same
# float32 arithmetic in the same order, and what is left is a few ulps.
TOLERANCE = 3e-6

_rng = np.random.RandomState(20240601)
LATENTS, IMAGE, NOISE, BLEND_NOISE = (_rng.standard_normal(SHAPE).astype(np.float32) for _ in range(4))
OUTPUTS = _rng.standard_normal((max(STEPS) + 1, *SHAPE)).astype(np.float32)
STEP_NOISE = _rng.standard_normal((max(STEPS) + 1, *SHAPE)).astype(np.float32)


def model(x_in: np.ndarray, i: int) -> np.ndarray:
    return (0.3 * x_in + OUTPUTS[i]).astype(np.float32)


@dataclass
class Trace:
    timesteps: np.ndarray
    init_noise_sigma: float
    arrays: list[tuple[str, np.ndarray]] = field(default_factory=list)
    draws: list[int] = field(default_factory=list)


@contextmanager
def supplied_step_noise(trace: Trace, current: list[int]) -> Iterator[None]:
    """diffusers' schedulers draw step noise from `randn_tensor`: hand them STEP_NOISE[step] instead."""
    modules = (scheduling_ddim, scheduling_dpmsolver_multistep, scheduling_euler_ancestral_discrete,
               scheduling_euler_discrete, scheduling_lcm)
    originals = [m.randn_tensor for m in modules]

    def fake(shape: tuple[int, ...], *args: object, dtype: torch.dtype | None = None, **kwargs: object) -> torch.Tensor:
        trace.draws.append(current[0])
        assert tuple(shape) == SHAPE
        return torch.from_numpy(STEP_NOISE[current[0]].copy()).to(dtype or torch.float32)

    for module in modules:
        module.randn_tensor = fake
    try:
        yield
    finally:
        for module, original in zip(modules, originals, strict=True):
            module.randn_tensor = original


def reference_run(sampler: str, config: dict, steps: int, strength: float) -> Trace | None:
    """diffusers' scheduler driven as the img2img/inpainting pipelines drive it (begin index set, start
    latents noised with `timesteps[:1]`, the known region re-noised with `timesteps[i + 1]` after step i).
    None when the truncated schedule is empty."""
    scheduler = diffusers_scheduler(sampler, config)
    scheduler.set_timesteps(steps)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    if len(timesteps) == 0:
        return None
    trace = Trace(timesteps.numpy(), float(scheduler.init_noise_sigma))
    if strength == 1.0:
        x = torch.from_numpy(LATENTS) * scheduler.init_noise_sigma
    else:
        x = scheduler.add_noise(torch.from_numpy(IMAGE), torch.from_numpy(NOISE), timesteps[:1])
    trace.arrays.append(("start", x.numpy()))
    current = [0]
    with supplied_step_noise(trace, current):
        for i, t in enumerate(timesteps):
            current[0] = i
            x_in = scheduler.scale_model_input(x, t)
            out = scheduler.step(torch.from_numpy(model(x_in.numpy(), i)), t, x)
            denoised = getattr(out, "denoised", None)
            if denoised is None:
                denoised = getattr(out, "pred_original_sample", None)
            if denoised is None:  # DPM-Solver keeps its x0 estimates to itself
                denoised = scheduler.model_outputs[-1]
            trace.arrays += [(f"scaled {i}", x_in.numpy()), (f"prev {i}", out.prev_sample.numpy()),
                             (f"denoised {i}", denoised.numpy())]
            if i + 1 < len(timesteps):
                renoised = scheduler.add_noise(torch.from_numpy(IMAGE), torch.from_numpy(BLEND_NOISE),
                                               timesteps[i + 1:i + 2])
                trace.arrays.append((f"add_noise {i + 1}", renoised.numpy()))
            x = out.prev_sample
    return trace


def our_run(scheduler: schedulers.Scheduler, steps: int, strength: float) -> Trace:
    schedule = scheduler.schedule(steps, strength)
    trace = Trace(schedule.timesteps, schedule.init_noise_sigma)
    x = LATENTS * schedule.init_noise_sigma if strength == 1.0 else scheduler.add_noise(schedule, 0, IMAGE, NOISE)
    trace.arrays.append(("start", x))
    previous: StepOutput | None = None
    last = len(schedule.timesteps) - 1
    for i in range(len(schedule.timesteps)):
        x_in = scheduler.scale_model_input(schedule, i, x)
        drawn = scheduler.draws_noise(schedule, i)  # checked against the steps diffusers drew at
        if drawn:
            trace.draws.append(i)
        previous = scheduler.step(schedule, i, model(x_in, i), x, previous, noise=STEP_NOISE[i] if drawn else None)
        trace.arrays += [(f"scaled {i}", x_in), (f"prev {i}", previous.prev_sample),
                         (f"denoised {i}", previous.denoised)]
        if i < last:
            trace.arrays.append((f"add_noise {i + 1}", scheduler.add_noise(schedule, i + 1, IMAGE, BLEND_NOISE)))
        x = previous.prev_sample
    return trace


def run_both(sampler: str, config: dict, steps: int, strength: float) -> tuple[Trace, Trace] | None:
    """Both traces, after checking what must agree exactly; None where diffusers refuses the combination
    or leaves no step to run, after checking that we refuse it too."""
    try:
        reference = reference_run(sampler, config, steps, strength)
    except Exception:  # diffusers fails on this combination: we must refuse it, with our own errors
        with pytest.raises((ModelInvalid, InvalidRequest)):
            our_run(schedulers.create(sampler, config), steps, strength)
        return None
    if reference is None:
        with pytest.raises((ModelInvalid, InvalidRequest)) as caught:
            schedulers.create(sampler, config).schedule(steps, strength)
        assert getattr(caught.value, "param", "strength") == "strength"
        return None
    trace = our_run(schedulers.create(sampler, config), steps, strength)
    where = f"{sampler} steps={steps} strength={strength}"
    if np.array_equal(reference.timesteps, reference.timesteps.round()):
        np.testing.assert_array_equal(trace.timesteps, reference.timesteps, err_msg=where)
    else:  # Karras σ mapped back to fractional timesteps inherit torch's inexact σ table (see TOLERANCE)
        np.testing.assert_allclose(trace.timesteps, reference.timesteps, rtol=1e-6, err_msg=where)
    assert trace.timesteps.dtype == reference.timesteps.dtype, where
    assert trace.init_noise_sigma == pytest.approx(reference.init_noise_sigma, rel=1e-6, abs=0), where
    assert trace.draws == reference.draws, where
    assert [name for name, _ in trace.arrays] == [name for name, _ in reference.arrays], where
    for (name, mine), (_, theirs) in zip(trace.arrays, reference.arrays, strict=True):
        assert mine.dtype == np.float32 and mine.shape == SHAPE, f"{where}: {name} is {mine.dtype} {mine.shape}"
        np.testing.assert_array_equal(np.isnan(mine), np.isnan(theirs), err_msg=f"{where}: NaNs in {name}")
    return trace, reference


def differences(trace: Trace, reference: Trace, cumulative: bool = False) -> Iterator[tuple[str, float]]:
    """Each array's largest difference relative to max(1, its largest magnitude) or, `cumulative`, to
    the largest magnitude the run has reached so far: with σ_max in the thousands (zero-SNR, cosine
    betas) the first steps subtract numbers of that size, and float32 keeps 7 digits of those, not of
    the O(1) result — in diffusers as in ours."""
    scale = 1.0
    for (name, mine), (_, theirs) in zip(trace.arrays, reference.arrays, strict=True):
        finite = ~np.isnan(theirs)
        magnitude = max(1.0, float(np.abs(theirs[finite]).max(initial=0.0)))
        scale = max(scale, magnitude) if cumulative else magnitude
        yield name, float(np.abs(mine - theirs)[finite].max(initial=0.0)) / scale


@pytest.mark.parametrize("config", list(MODELS.values()) + list(EDGES.values()), ids=[*MODELS, *EDGES])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_matches_diffusers_step_by_step(sampler: str, config: dict) -> None:
    extreme = config in EDGES.values()
    for steps in STEPS:
        for strength in STRENGTHS:
            traces = run_both(sampler, config, steps, strength)
            for name, error in differences(*traces, cumulative=extreme) if traces else ():
                assert error <= TOLERANCE, f"{sampler} steps={steps} strength={strength}: {name} differs by {error:.3g}"


@pytest.mark.parametrize("steps", [14, 15, 16])
def test_dpm_final_order_follows_full_schedule_length(steps: int) -> None:
    """With a nonzero final σ, DPM++ keeps second order at the last step only for schedules of 15 steps
    or more — counted before img2img truncation."""
    for strength in (1.0, 0.3):
        traces = run_both("dpmpp_2m", EDGES["final_sigma_min"], steps, strength)
        assert traces is not None
        for name, error in differences(*traces):
            assert error <= TOLERANCE, f"steps={steps} strength={strength}: {name} differs by {error:.3g}"


@pytest.mark.parametrize("config", [SD15, SDXL, EDGES["cosine_karras"], EDGES["trained_clip_x0"]],
                         ids=["sd15", "sdxl", "cosine", "trained"])
def test_noise_tables_are_bit_exact(config: dict) -> None:
    """ᾱ exactly as diffusers' float32 torch code computes it (torch.linspace, float64-accumulated cumprod)."""
    for sampler in ("euler", "ddim", "dpmpp_2m", "lcm"):
        theirs = diffusers_scheduler(sampler, config).alphas_cumprod.numpy()
        np.testing.assert_array_equal(schedulers.create(sampler, config).alphas_cumprod, theirs, err_msg=sampler)


def test_zero_snr_tables() -> None:
    """Zero-SNR rescaling takes square roots, which torch rounds inexactly: close, with the terminal
    ᾱ at 0 for DDIM and LCM and at 2⁻²⁴ for the σ-based samplers."""
    config = EDGES["zero_snr"]
    for sampler in ("euler", "ddim", "dpmpp_2m", "lcm"):
        theirs = diffusers_scheduler(sampler, config).alphas_cumprod.numpy()
        ours = schedulers.create(sampler, config).alphas_cumprod
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=0, err_msg=sampler)
        assert ours[-1] == theirs[-1] == (2.0**-24 if sampler in ("euler", "dpmpp_2m") else 0.0)


def test_unknown_sampler() -> None:
    with pytest.raises(InvalidRequest) as caught:
        schedulers.create("heun", SD15)
    assert caught.value.param == "sampler"
    assert "heun" in caught.value.message and ", ".join(SAMPLERS) in caught.value.message


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [0, -3, 1.5, True, "4", 1001])
def test_bad_steps(sampler: str, steps: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        schedulers.create(sampler, SD15).schedule(steps)  # type: ignore[arg-type]
    assert caught.value.param == "steps"


def test_lcm_steps_limited_by_distillation_schedule() -> None:
    scheduler = schedulers.create("lcm", SD15)
    assert len(scheduler.schedule(50).timesteps) == 50
    with pytest.raises(InvalidRequest) as caught:
        scheduler.schedule(51)
    assert caught.value.param == "steps"


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize(("steps", "strength"), [(1, 0.6), (4, 0.2), (30, 0.03), (4, 0.0), (4, 1.5), (4, None)])
def test_strength_without_steps_to_run(sampler: str, steps: int, strength: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        schedulers.create(sampler, SD15).schedule(steps, strength)  # type: ignore[arg-type]
    assert caught.value.param == "strength"


@pytest.mark.parametrize(("sampler", "config", "key"), [
    ("euler", {"beta_schedule": "sigmoid"}, "beta_schedule"),
    ("ddim", {"thresholding": True}, "thresholding"),
    ("lcm", {"thresholding": True}, "thresholding"),
    ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
    ("euler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ("euler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}, "timestep_type"),
    ("euler_a", {"prediction_type": "sample"}, "prediction_type"),
    ("dpmpp_2m", {"use_lu_lambdas": True}, "use_lu_lambdas"),
    ("dpmpp_2m_karras", {"variance_type": "learned_range"}, "variance_type"),
    ("dpmpp_2m", {"solver_type": "taylor"}, "solver_type"),
    ("ddim", {"timestep_spacing": "karras"}, "timestep_spacing"),
    ("ddim", {"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ("ddim", {"num_train_timesteps": "many"}, "num_train_timesteps"),
    ("lcm", {"original_inference_steps": 2000}, "original_inference_steps"),
    ("euler", ["not", "a", "dict"], "JSON object"),
])
def test_config_we_cannot_honour(sampler: str, config: object, key: str) -> None:
    with pytest.raises(ModelInvalid, match=key):
        schedulers.create(sampler, config)  # type: ignore[arg-type]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_one_scheduler_serves_interleaved_renders(sampler: str) -> None:
    scheduler = schedulers.create(sampler, SDXL)
    alone = {steps: our_run(scheduler, steps, 1.0).arrays for steps in (4, 13)}
    schedules = {4: scheduler.schedule(4), 13: scheduler.schedule(13)}
    state: dict[int, tuple[np.ndarray, StepOutput | None]] = {
        steps: (LATENTS * s.init_noise_sigma, None) for steps, s in schedules.items()}
    results: dict[int, list[np.ndarray]] = {4: [], 13: []}
    for i in range(13):
        for steps in (13, 4):
            if i >= steps:
                continue
            schedule, (x, previous) = schedules[steps], state[steps]
            noise = STEP_NOISE[i] if scheduler.draws_noise(schedule, i) else None
            out = scheduler.step(schedule, i, model(scheduler.scale_model_input(schedule, i, x), i), x, previous, noise)
            state[steps] = (out.prev_sample, out)
            results[steps].append(out.prev_sample)
    for steps in (4, 13):
        expected = [array for name, array in alone[steps] if name.startswith("prev ")]
        assert len(expected) == steps
        for mine, theirs in zip(results[steps], expected, strict=True):
            np.testing.assert_array_equal(mine, theirs)


def test_schedules_are_immutable() -> None:
    schedule = schedulers.create("dpmpp_2m", SDXL).schedule(8)
    with pytest.raises(ValueError, match="read-only"):
        schedule.timesteps[0] = 0
    with pytest.raises(AttributeError):
        schedule.init_noise_sigma = 2.0  # type: ignore[misc]


def test_step_noise_requirements() -> None:
    euler_a = schedulers.create("euler_a", SDXL)
    schedule = euler_a.schedule(4)
    with pytest.raises(ValueError, match="noise"):
        euler_a.step(schedule, 3, OUTPUTS[0], LATENTS)
    lcm = schedulers.create("lcm", SDXL)
    schedule = lcm.schedule(4)
    with pytest.raises(ValueError, match="noise"):
        lcm.step(schedule, 0, OUTPUTS[0], LATENTS)
    last = lcm.step(schedule, 3, OUTPUTS[0], LATENTS)
    np.testing.assert_array_equal(last.prev_sample, last.denoised)
    assert [lcm.draws_noise(schedule, i) for i in range(4)] == [True, True, True, False]
    assert [euler_a.draws_noise(euler_a.schedule(4, 0.5), i) for i in range(2)] == [True, True]
    assert [schedulers.create(s, SDXL).needs_step_noise for s in SAMPLERS] == [False, True, False, False, False, True]


def test_schedule_from_another_scheduler_is_refused() -> None:
    with pytest.raises(TypeError):
        schedulers.create("euler", SDXL).step(schedulers.create("ddim", SDXL).schedule(4), 0, OUTPUTS[0], LATENTS)


def test_samplers_import_neither_torch_nor_diffusers() -> None:
    """The samplers serve without PyTorch: not one of their modules may import it, even lazily."""
    for path in Path(schedulers.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("torch", "diffusers")], path.name
