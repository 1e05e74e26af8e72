"""What a render reports while it runs: `on_step(done, total)` after every step (raise to stop it), and
partial images: `on_partial(Partial)` with a preview of the denoiser's estimate of the final image
(x0) at `partial_images` evenly spaced steps of each chunk of images.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines import images
from engines.errors import EngineError, RenderCancelled
from engines.preview import Previewer, PreviewMode

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Partial:
    index: int  # the image within the request (0 … n-1)
    partial_index: int  # 0 … partial_images-1, per image
    step: int  # steps done when the estimate was taken
    total: int
    image: Any  # PIL.Image.Image


PartialCallback = Callable[[Partial], None]


def partial_steps(total: int, count: int) -> list[int]:
    """Evenly spaced steps (1-based, steps done) for `count` partial images over `total` steps; fewer when
    there are fewer steps than partial images."""
    return sorted({min(total, max(1, math.ceil((j + 1) * total / (count + 1)))) for j in range(count)})


class StepHook:
    """The pipeline calls this after each step of a chunk with that step's x0 estimate."""

    def __init__(self, on_step: StepCallback | None, on_partial: PartialCallback | None, count: int,
                 previewer: Previewer, mode: PreviewMode) -> None:
        self.on_step, self.on_partial, self.count = on_step, on_partial, count
        self.previewer, self.mode = previewer, mode

    def __call__(self, done: int, total: int, first_image: int, denoised: np.ndarray) -> None:
        if self.on_step is not None:
            _report(functools.partial(self.on_step, done, total))
        if self.on_partial is None or not self.count:
            return
        steps = partial_steps(total, self.count)
        if done not in steps:
            return
        pictures = images.to_pil(self.previewer.pixels(denoised, self.mode))
        for offset, picture in enumerate(pictures):
            partial = Partial(first_image + offset, steps.index(done), done, total, picture)
            _report(functools.partial(self.on_partial, partial))


def _report(call: Callable[[], None]) -> None:
    """A progress callback; one that raises asks the render to stop (a client gone, a closed loop)."""
    try:
        call()
    except EngineError:
        raise
    except Exception as exc:  # the caller asked to stop: its own reason rides along as the cause
        raise RenderCancelled(str(exc) or type(exc).__name__) from exc
