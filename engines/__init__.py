"""A torch-free diffusion runtime: load a model directory, render on ONNX Runtime.

    import engines
    pipe = engines.load("models/tiny-sdxl", backend="auto")
    result = pipe.render(engines.RenderRequest(prompt="a cat", width=256, height=256, steps=8,
                                               guidance_scale=5.0, sampler="euler", seed=1))
    result.images[0].save("cat.png")

The server sees only this surface: `load`, `Pipeline.render`, `Pipeline.info` and the errors.
`load` and `Pipeline` are imported on first use, so that a router (which holds no engines) needs no
ONNX Runtime installed.
"""

from typing import TYPE_CHECKING

from engines.errors import (
    EngineError,
    EngineFailure,
    InvalidRequest,
    ModelInvalid,
    ModelNotFound,
    RenderCancelled,
)
from engines.info import ModelInfo
from engines.noise import Noise
from engines.progress import Partial
from engines.render import RenderRequest, RenderResult, Timings
from engines.schedulers import SAMPLERS

__all__ = [
    "SAMPLERS",
    "EngineError",
    "EngineFailure",
    "InvalidRequest",
    "ModelInfo",
    "ModelInvalid",
    "ModelNotFound",
    "Noise",
    "Partial",
    "Pipeline",
    "RenderCancelled",
    "RenderRequest",
    "RenderResult",
    "Timings",
    "load",
]

if TYPE_CHECKING:
    from engines.pipeline import Pipeline, load


def __getattr__(name: str) -> object:
    if name in ("Pipeline", "load"):
        from engines import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'engines' has no attribute {name!r}")
