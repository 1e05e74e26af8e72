"""Numpy samplers that reproduce diffusers' schedulers step for step, without PyTorch.

    scheduler = schedulers.create("euler", scheduler_config)   # the model's scheduler_config.json
    schedule = scheduler.schedule(steps=30, strength=1.0)     # immutable, one per render
    x = noise * schedule.init_noise_sigma
    previous = None
    for i, t in enumerate(schedule.timesteps):
        eps = unet(scheduler.scale_model_input(schedule, i, x), t)
        noise = draw() if scheduler.draws_noise(schedule, i) else None   # LCM: not at the last step
        previous = scheduler.step(schedule, i, eps, x, previous, noise)
        x = previous.prev_sample

Each sampler reads the config the way `TheirClass.from_config(config, **overrides)` would, whatever class
the config was written for, and refuses (ModelInvalid) the settings it cannot reproduce.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from engines.errors import InvalidRequest
from engines.manifest import SAMPLERS
from engines.schedulers.base import Schedule, Scheduler, StepOutput
from engines.schedulers.ddim import DDIM
from engines.schedulers.dpmpp_2m import DPMSolverPP2M
from engines.schedulers.euler import Euler
from engines.schedulers.euler_ancestral import EulerAncestral
from engines.schedulers.lcm import LCM

_FACTORIES: dict[str, Callable[[Mapping[str, Any]], Scheduler]] = {
    "euler": Euler,
    "euler_a": EulerAncestral,
    "ddim": DDIM,
    "dpmpp_2m": lambda config: DPMSolverPP2M(config, "dpmpp_2m", karras=False),
    "dpmpp_2m_karras": lambda config: DPMSolverPP2M(config, "dpmpp_2m_karras", karras=True),
    "lcm": LCM,
}


def create(sampler: str, config: Mapping[str, Any]) -> Scheduler:
    """The sampler `sampler` over the model's diffusers scheduler config (a parsed scheduler_config.json).
    Cheap (a few 1000-entry tables): build one per request or keep one per model, both are safe."""
    factory = _FACTORIES.get(sampler) if isinstance(sampler, str) else None
    if factory is None:
        raise InvalidRequest("sampler", f"unknown sampler {sampler!r}; one of: {', '.join(SAMPLERS)}")
    return factory(config)


__all__ = ["SAMPLERS", "Schedule", "Scheduler", "StepOutput", "create"]
