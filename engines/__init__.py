"""A torch-free diffusion runtime: load a model directory, render on ONNX Runtime.

    import engines
    pipe = engines.load("models/tiny-sdxl", backend="auto")
    result = pipe.render(engines.RenderRequest(prompt="a cat", width=256, height=256, steps=8,
                                               guidance_scale=5.0, sampler="euler", seed=1))
    result.images[0].save("cat.png")

What the server uses, and all it may use:
    `describe(model_dir, …)` → its `ModelInfo` from the manifest, without loading it
    `load(model_dir, …)` → a `Pipeline`: `render(request)` for a render alone, or for step-level batching
        `begin` / `step` / `batch_key` over `rendering.Rendering`s (`finished`, `rows`, `progress`, `result`); `info`, a
        `ModelInfo` (sizes with `sizes.check`, defaults, `rows(n, guidance)`, adapters, `controlnets`:
        `ControlNetInfo`s, `controlnet_inputs`); `RenderRequest.controlnet`, `ControlUnit`s; `tokenize`, the
        prompts checked and tokenized once per request, handed back as `RenderRequest.tokens`;
        `load_adapters`; `max_batch` and `unet_rows`
    `limits`: every request bound and rule (steps, guidance, strength, seeds, LoRA, ControlNet units, steps
        run, strength defaults), each check raising `InvalidRequest(param, message)`; the server's Structs take their
        bounds from it
    `is_model_dir`, `Partial` (a streamed preview) and the errors (`engines.errors`).
`load` takes our model directories (with `model.json`) and ONNX pipeline folders in optimum's layout.
`load` and `Pipeline` are imported on first use, so that a router (which holds no engines) needs no
ONNX Runtime installed.
"""

from typing import TYPE_CHECKING

from engines import limits
from engines.errors import (
    EngineError,
    EngineFailure,
    InvalidRequest,
    ModelInvalid,
    ModelNotFound,
    RenderCancelled,
)
from engines.info import ControlNetInfo, ModelInfo
from engines.noise import Noise
from engines.optimum_folder import is_model_dir
from engines.progress import Partial
from engines.render import ControlUnit, RenderRequest, RenderResult, Timings, Tokens
from engines.schedulers import SAMPLERS

__all__ = [
    "SAMPLERS",
    "ControlNetInfo",
    "ControlUnit",
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
    "Tokens",
    "describe",
    "is_model_dir",
    "limits",
    "load",
]

if TYPE_CHECKING:
    from engines.description import describe
    from engines.pipeline import Pipeline, load


def __getattr__(name: str) -> object:
    if name == "describe":
        from engines import description

        return description.describe
    if name in ("Pipeline", "load"):
        from engines import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'engines' has no attribute {name!r}")
