"""The diffusers references our numpy code must reproduce (test-only: imports torch and diffusers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}

REFERENCES: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
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
    cls, overrides = REFERENCES[sampler]
    return cls.from_config(dict(config), **overrides)
