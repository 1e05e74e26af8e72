"""What the UNet is fed at each step of a render, and which renders may share one call.

Rows come in guidance copies, the negative prompt's half first: latents (scaled for the sampler, plus the
mask channels of 9-channel UNets), one timestep per row (or one for the whole call, for graphs exported
with a scalar timestep, as optimum's), the text conditioning and SDXL's pooled text and time ids.
"""

from __future__ import annotations

import numpy as np

from engines.job import Job
from engines.rendering import Prompt, Rendering


def text_conditioning(job: Job, prompt: Prompt, count: int, aesthetics_score: bool) -> dict[str, np.ndarray]:
    """The UNet's text inputs for `count` images (SDXL: with the (size, crop, target size) time ids, or the
    refiner's aesthetic scores)."""
    feeds = {"encoder_hidden_states": np.repeat(prompt.embeds, count, axis=0)}
    if prompt.pooled is not None:
        feeds["text_embeds"] = np.repeat(prompt.pooled, count, axis=0)
        size = [job.height, job.width]
        if aesthetics_score:
            ids = [[*size, 0, 0, score] for score in ((2.5, 6.0) if job.guided else (6.0,))]
        else:
            ids = [[*size, 0, 0, *size]] * job.copies
        feeds["time_ids"] = np.repeat(np.array(ids, np.float32), count, axis=0)
    return feeds


def step_inputs(rendering: Rendering, scalar_timestep: bool) -> dict[str, np.ndarray]:
    """The UNet's inputs for the current step of a rendering's chunk."""
    job, chunk, schedule = rendering.job, rendering.chunk, rendering.schedule
    assert chunk is not None
    model_input = job.scheduler.scale_model_input(schedule, chunk.step, np.concatenate([chunk.x] * job.copies))
    if chunk.mask_input is not None:
        model_input = np.concatenate([model_input, chunk.mask_input], axis=1)
    t = schedule.timesteps[chunk.step]
    timestep = np.float32(t) if scalar_timestep else np.full(model_input.shape[0], t, np.float32)
    return {"sample": model_input, "timestep": timestep, **chunk.conditioning}


def batch_key(rendering: Rendering, scalar_timestep: bool) -> tuple:
    """Renderings with equal keys may share a UNet call: same latent size, prompt length and LoRA feeds
    (and timestep, for graphs that take one timestep for the whole call)."""
    chunk = rendering.chunk
    if chunk is None:
        return ()
    scalar_t = rendering.schedule.timesteps[chunk.step] if scalar_timestep else None
    return (chunk.x.shape[1:], rendering.prompt.embeds.shape[1:], rendering.lora.key, scalar_t)
