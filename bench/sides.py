"""The sides `bench pipeline` compares: the engines per backend (and decoder), PyTorch per precision.

A side renders once per call and collects its stage times. Sides that can share a loaded pipeline share it:
one engines pipeline serves both decoders, one fp32 PyTorch pipeline serves fp32 and bf16 (autocast). The
first side of such a group pays the load, and its memory window (load and warm-up) is the one that holds
the weights; the others' windows hold their warm-up alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

import engines
from bench import memory
from bench.errors import BenchError
from bench.stats import Summary, summarize
from engines import manifest as mf

STAGES = ("text_encoder", "unet", "vae_decoder", "total")
Render = Callable[[], tuple[dict[str, float], list[float], np.ndarray]]  # stages, UNet steps, pixels
Tick = Callable[[str], None]


class Side(msgspec.Struct, kw_only=True):
    """One side's numbers: seconds per stage over the measured repetitions."""

    name: str  # "engines cpu", "engines openvino:fp32 tiny decoder", "PyTorch bf16", …
    kind: str  # "engines" or "reference"
    runs_on: str  # backend and device, for people
    load_seconds: float
    memory_mb: float  # resident-set growth over load and warm-up
    device_memory_mb: float | None  # GPU memory growth over the same window (nvidia-smi), or None
    stages: dict[str, Summary]  # text_encoder, unet, vae_decoder, total
    unet_step: Summary | None
    totals: list[float]


@dataclass(frozen=True)
class Job:
    """What every side renders: resolved settings and the shared starting latents."""

    width: int
    height: int
    steps: int
    sampler: str
    guidance_scale: float
    latents: np.ndarray
    prompt: str
    seed: int


@dataclass
class Contender:
    """One side while it runs: how to render once, and what its renders measured."""

    name: str
    kind: str
    runs_on: str
    render: Render
    load_seconds: float = 0.0
    memory: tuple[float, float | None] = (0.0, None)  # MiB growth: resident set, GPU
    stages: dict[str, list[float]] = field(default_factory=lambda: {stage: [] for stage in STAGES})
    steps: list[float] = field(default_factory=list)

    def measure(self) -> tuple[float, np.ndarray]:
        stages, steps, pixels = self.render()
        for stage in STAGES:
            if stage in stages:
                self.stages[stage].append(stages[stage])
        self.steps.extend(steps)
        return stages["total"], pixels

    def side(self) -> Side:
        summaries = {stage: s for stage, values in self.stages.items() if (s := summarize(values)) is not None}
        return Side(name=self.name, kind=self.kind, runs_on=self.runs_on, load_seconds=self.load_seconds,
                    memory_mb=self.memory[0], device_memory_mb=self.memory[1], stages=summaries,
                    unet_step=summarize(self.steps), totals=self.stages["total"])


def engines_sides(root: Path, job: Job, backends: list[str], decoders: list[str], threads: int | None,
                  lora_dir: str | None, lora: list[tuple[str, float]], warmup: int, tick: Tick) -> list[Contender]:
    """One side per backend ("NAME" or "openvino:PRECISION") and decoder, each loaded and warmed up."""
    sides = []
    for spec in backends:
        backend, _, precision = spec.partition(":")
        pipe: engines.Pipeline | None = None
        for decoder in decoders:
            with memory.PeakMemory() as window:
                begun = time.perf_counter()
                if pipe is None:
                    pipe = engines.load(root, backend=backend, threads=threads, lora_dir=lora_dir,
                                        precision=precision or "auto")
                name = f"engines {spec}" + (" tiny decoder" if decoder == "tiny" else "")
                side = Contender(name, "engines", f"{pipe.info.backend} on {pipe.info.device}",
                                 _engines_render(pipe, job, decoder, lora), time.perf_counter() - begun)
                warm_up(side, warmup, tick)
            side.memory = window.growth()
            sides.append(side)
    return sides


def _engines_render(pipe: engines.Pipeline, job: Job, decoder: str, lora: list[tuple[str, float]]) -> Render:
    request = engines.RenderRequest(prompt=job.prompt, width=job.width, height=job.height, steps=job.steps,
                                    guidance_scale=job.guidance_scale, sampler=job.sampler, seed=job.seed,
                                    n=len(job.latents), lora=list(lora), decoder=decoder)

    def render() -> tuple[dict[str, float], list[float], np.ndarray]:
        result = pipe.render(request, latents=job.latents)
        return dict(result.timings.stages), list(result.timings.steps), result.pixels

    return render


def reference_sides(root: Path, manifest: mf.Manifest, job: Job, precisions: list[str], device: str | None,
                    checkpoint: str | None, threads: int | None, warmup: int, tick: Tick) -> list[Contender]:
    """One side per precision: fp32 and bf16 (`torch.autocast`) on one fp32 pipeline, fp16 on its own."""
    try:
        from bench import reference  # torch and diffusers: only when a reference run is asked for
        from export.errors import ExportError
    except ImportError as exc:
        raise BenchError(f"the PyTorch reference needs the export extra ({exc}); install .[export] or pass "
                         "--no-reference") from exc
    reference.set_threads(threads)
    device = device or reference.default_device()
    loaded: dict[str, Any] = {}
    sides = []
    for precision in precisions:
        weights = "fp16" if precision == "fp16" else "fp32"
        with memory.PeakMemory() as window:
            begun = time.perf_counter()
            if weights not in loaded:
                try:
                    loaded[weights] = reference.load(root, manifest, device, weights, checkpoint)
                except ExportError as exc:
                    raise BenchError(f"cannot rebuild the PyTorch reference: {exc} (pass --checkpoint, or "
                                     "--no-reference)") from exc
            pipe = loaded[weights]
            autocast = " autocast" if precision == "bf16" else ""
            side = Contender(f"PyTorch {precision}", "reference", f"PyTorch {pipe.device.type} {precision}{autocast}",
                             _reference_render(pipe, job, precision == "bf16"), time.perf_counter() - begun)
            warm_up(side, warmup, tick)
        side.memory = window.growth()
        sides.append(side)
    return sides


def _reference_render(pipe: Any, job: Job, bf16: bool) -> Render:
    def render() -> tuple[dict[str, float], list[float], np.ndarray]:
        begun = time.perf_counter()
        pixels = pipe.render(job.prompt, job.width, job.height, job.steps, job.guidance_scale, job.sampler,
                             job.latents, bf16=bf16)
        stages = dict(pipe.clock.stages) | {"total": time.perf_counter() - begun}
        return stages, list(pipe.clock.steps), pixels

    return render


def warm_up(contender: Contender, count: int, tick: Tick) -> None:
    for _ in range(count):
        contender.render()
        tick(f"{contender.name} warm-up")
