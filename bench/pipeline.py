"""`bench pipeline`: the engines against the diffusers reference, same weights and settings, one run.

Both sides render from the same starting latents at the same size, steps, sampler, guidance and
prompt. After a warm-up of each, the repetitions alternate A/B (engines first on even repetitions,
reference first on odd ones) so that drift in the machine's speed falls on both alike.

Memory is the growth of the process's resident set (and of the GPU's used memory) from just before
a side is loaded to the peak of its load and warm-up: both sides share one process, so only that
window belongs to one side alone.
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
from bench import hardware, memory, report
from bench.errors import BenchError
from bench.stats import Summary, summarize
from engines import manifest as mf

STAGES = ("text_encoder", "unet", "vae_decoder", "total")
NOISY_SAMPLERS = ("euler_a", "lcm")  # draw noise every step: the two sides' images differ by design


class PipelineSettings(msgspec.Struct, frozen=True, kw_only=True):
    model_dir: str
    backend: str = "auto"
    threads: int | None = None
    width: int | None = None  # default: the model's native size
    height: int | None = None
    steps: int | None = None  # default: the model's
    sampler: str | None = None
    guidance_scale: float | None = None
    batch: int = 1
    repeat: int = 3
    warmup: int = 1
    reference: bool = True
    reference_device: str | None = None  # default: cuda when torch sees a GPU, else cpu
    precision: mf.Precision | None = None  # the reference's; default: the exported UNet's precision
    checkpoint: str | None = None  # rebuild the reference from this instead of the manifest's source
    prompt: str = "a photograph of an astronaut riding a horse on the moon, detailed, 35mm"
    seed: int = 0
    lora_dir: str | None = None  # LoRA adapters for the engines' side
    lora: list[tuple[str, float]] = []  # (name, scale) applied to every engines render


class Side(msgspec.Struct, kw_only=True):
    """One implementation's numbers: seconds per stage over the measured repetitions."""

    name: str  # "engines" or "reference"
    runs_on: str  # backend and device, for people
    load_seconds: float
    memory_mb: float  # resident-set growth over load and warm-up
    device_memory_mb: float | None  # GPU memory growth over the same window (nvidia-smi), or None
    stages: dict[str, Summary]  # text_encoder, unet, vae_decoder, total
    unet_step: Summary | None
    totals: list[float]


class PipelineResult(msgspec.Struct, kw_only=True):
    kind: str = "pipeline"
    started: str
    settings: PipelineSettings
    model: dict[str, Any]
    resolved: dict[str, Any]  # size, steps, sampler, guidance actually used
    hardware: hardware.Hardware
    versions: dict[str, str]
    engines: Side
    reference: Side | None
    ratio: Summary | None  # engines total / reference total, per A/B pair
    # max |engines - reference| over every pixel of every repetition, 0-1 scale; None without a reference or
    # for samplers that draw fresh noise each step (euler_a, lcm): each side draws its own
    max_pixel_diff: float | None


Render = Callable[[], tuple[dict[str, float], list[float], np.ndarray]]  # stages, UNet steps, pixels


@dataclass
class Contender:
    """One side of the comparison: how to render once, and what its renders measured."""

    name: str  # "engines" or "reference"
    runs_on: str  # backend and device, for people
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
        return Side(name=self.name, runs_on=self.runs_on, load_seconds=self.load_seconds, memory_mb=self.memory[0],
                    device_memory_mb=self.memory[1], stages=summaries, unet_step=summarize(self.steps),
                    totals=self.stages["total"])


@dataclass(frozen=True)
class Job:
    """What both sides render: resolved settings and the shared starting latents."""

    width: int
    height: int
    steps: int
    sampler: str
    guidance_scale: float
    latents: np.ndarray


def run(settings: PipelineSettings, progress: Callable[[str], None] | None = None) -> PipelineResult:
    """Load both sides, warm them up, run the alternating repetitions, and summarise."""
    tick = progress or (lambda _label: None)
    check(settings)
    root = Path(settings.model_dir)
    started = report.now()
    manifest = mf.read(root)
    with memory.PeakMemory() as window:
        begun = time.perf_counter()
        pipe = engines.load(root, backend=settings.backend, threads=settings.threads, lora_dir=settings.lora_dir)
        job = _job(settings, pipe.info, manifest)
        ours = Contender("engines", f"{pipe.info.backend} on {pipe.info.device}", _engines_render(pipe, job, settings),
                         load_seconds=time.perf_counter() - begun)
        _warm_up(ours, settings.warmup, tick)
    ours.memory = window.growth()
    contenders, reference = [ours], None
    if settings.reference:
        with memory.PeakMemory() as window:
            begun = time.perf_counter()
            reference = _load_reference(settings, root, manifest)
            theirs = Contender("reference", f"PyTorch {reference.device.type} {str(reference.pipe.unet.dtype)[6:]}",
                               _reference_render(reference, job, settings), load_seconds=time.perf_counter() - begun)
            _warm_up(theirs, settings.warmup, tick)
        theirs.memory = window.growth()
        contenders.append(theirs)
    ratios, worst = _alternate(contenders, settings.repeat, tick)
    if job.sampler in NOISY_SAMPLERS:
        worst = None
    return PipelineResult(
        started=started, settings=settings,
        model={"id": pipe.info.id, "name": manifest.name, "family": manifest.family, "variant": manifest.variant,
               "precision": manifest.components["unet"].precision, "source": manifest.source.kind},
        resolved={"width": job.width, "height": job.height, "steps": job.steps, "sampler": job.sampler,
                  "guidance_scale": job.guidance_scale, "batch": settings.batch,
                  "reference_device": reference.device.type if reference else None,
                  "reference_precision": _reference_precision(settings, manifest) if reference else None},
        hardware=hardware.describe(),
        versions=hardware.versions("sdserve", "onnxruntime", "onnxruntime-gpu", "numpy", "torch", "diffusers",
                                   "transformers", "tensorrt"),
        engines=ours.side(), reference=contenders[1].side() if reference else None,
        ratio=summarize(ratios), max_pixel_diff=worst,
    )


def check(settings: PipelineSettings) -> None:
    """Counts that would leave nothing to report fail before any work."""
    if settings.repeat < 1 or settings.batch < 1 or settings.warmup < 0:
        raise BenchError("--repeat and --batch must be at least 1, --warmup at least 0")
    if settings.threads is not None and settings.threads < 1:
        raise BenchError("--threads must be at least 1")
    if settings.lora and settings.reference:
        raise BenchError("--lora times the engines alone: add --no-reference")


def total_runs(settings: PipelineSettings) -> int:
    sides = 2 if settings.reference else 1
    return sides * (settings.warmup + settings.repeat)


def _job(settings: PipelineSettings, info: engines.ModelInfo, manifest: mf.Manifest) -> Job:
    d = info.defaults
    width, height = settings.width or d.width, settings.height or d.height
    scale = manifest.vae_scale_factor
    latents = np.random.default_rng(settings.seed).standard_normal(
        (settings.batch, manifest.latent_channels, height // scale, width // scale), dtype=np.float32)
    guidance = settings.guidance_scale if settings.guidance_scale is not None else d.guidance_scale
    return Job(width=width, height=height, steps=settings.steps or d.steps, sampler=settings.sampler or d.sampler,
               guidance_scale=guidance, latents=latents)


def _engines_render(pipe: engines.Pipeline, job: Job, settings: PipelineSettings) -> Render:
    request = engines.RenderRequest(prompt=settings.prompt, width=job.width, height=job.height, steps=job.steps,
                                    guidance_scale=job.guidance_scale, sampler=job.sampler, seed=settings.seed,
                                    n=settings.batch, lora=list(settings.lora))

    def render() -> tuple[dict[str, float], list[float], np.ndarray]:
        result = pipe.render(request, latents=job.latents)
        return dict(result.timings.stages), list(result.timings.steps), result.pixels

    return render


def _reference_render(reference: Any, job: Job, settings: PipelineSettings) -> Render:
    def render() -> tuple[dict[str, float], list[float], np.ndarray]:
        begun = time.perf_counter()
        pixels = reference.render(settings.prompt, job.width, job.height, job.steps, job.guidance_scale,
                                  job.sampler, job.latents)
        stages = dict(reference.clock.stages) | {"total": time.perf_counter() - begun}
        return stages, list(reference.clock.steps), pixels

    return render


def _reference_precision(settings: PipelineSettings, manifest: mf.Manifest) -> mf.Precision:
    return settings.precision or manifest.components["unet"].precision


def _load_reference(settings: PipelineSettings, root: Path, manifest: mf.Manifest) -> Any:
    try:
        from bench import reference  # torch and diffusers: only when a reference run is asked for
        from export.errors import ExportError
    except ImportError as exc:
        raise BenchError(f"the PyTorch reference needs the export extra ({exc}); install .[export] or pass "
                         "--no-reference") from exc

    reference.set_threads(settings.threads)
    try:
        return reference.load(root, manifest, settings.reference_device or reference.default_device(),
                              _reference_precision(settings, manifest), settings.checkpoint)
    except ExportError as exc:
        raise BenchError(f"cannot rebuild the PyTorch reference: {exc} (pass --checkpoint, or --no-reference)") from exc


def _warm_up(contender: Contender, count: int, tick: Callable[[str], None]) -> None:
    for _ in range(count):
        contender.render()
        tick(f"{contender.name} warm-up")


def _alternate(contenders: list[Contender], repeat: int, tick: Callable[[str], None]) -> tuple[list[float],
                                                                                               float | None]:
    """The measured repetitions, A/B then B/A; per pair the time ratio and the largest pixel difference."""
    ratios, worst = [], None
    for index in range(repeat):
        order = contenders if index % 2 == 0 else contenders[::-1]
        outputs = {}
        for contender in order:
            outputs[contender.name] = contender.measure()
            tick(f"{contender.name} {index + 1}/{repeat}")
        if len(outputs) == 2:
            (ours, ours_pixels), (theirs, their_pixels) = outputs["engines"], outputs["reference"]
            ratios.append(ours / theirs)
            diff = float(np.abs(ours_pixels - their_pixels).max())
            worst = diff if worst is None else max(worst, diff)
    return ratios, worst


def markdown(result: PipelineResult) -> str:
    r = result.resolved
    head = (f"**{result.model['id']}** ({result.model['family']}/{result.model['variant']}, "
            f"{result.model['precision']}), {r['width']}×{r['height']}, {r['steps']} steps, {r['sampler']}, "
            f"guidance {r['guidance_scale']}, batch {r['batch']}; {result.settings.repeat} repetitions after "
            f"{result.settings.warmup} warm-up; {result.hardware.cpu} ({result.hardware.cores} cores)"
            + "".join(f", {g.name}" for g in result.hardware.gpus) + f"; {result.started}")
    sides = [result.engines] + ([result.reference] if result.reference else [])
    rows = []
    for side in sides:
        total = side.stages["total"]
        rows.append([side.name, side.runs_on, total.median, total.min, total.max,
                     _median(side, "text_encoder"), side.unet_step.median if side.unet_step else None,
                     _median(side, "vae_decoder"), side.load_seconds, side.memory_mb, side.device_memory_mb])
    lines = [head, "", report.table(
        ["side", "runs on", "total s (median)", "min", "max", "text enc. s", "UNet step s", "VAE dec. s",
         "load s", "RAM MiB", "VRAM MiB"], rows)]
    if result.ratio is not None:
        diff = ("not compared (the sampler draws its own noise each step)" if result.max_pixel_diff is None
                else f"{result.max_pixel_diff:.2g} on a 0–1 scale")
        lines += ["", f"engines / reference time: median {result.ratio.median:.3f} "
                      f"(min {result.ratio.min:.3f}, max {result.ratio.max:.3f}); max pixel difference {diff}",
                  "", "UNet step: the UNet call, the guidance mix and the sampler step; RAM/VRAM: growth from "
                      "loading through the warm-up"]
    return "\n".join(lines)


def figure(result: PipelineResult) -> Any:
    """Median seconds per stage, side by side, with min–max whiskers."""
    fig, ax = report.new_figure()
    sides = [result.engines] + ([result.reference] if result.reference else [])
    labels = ["text encoder", "UNet step", "VAE decoder", "total"]
    width = 0.8 / len(sides)
    for offset, side in enumerate(sides):
        stats = [side.stages.get("text_encoder"), side.unet_step, side.stages.get("vae_decoder"),
                 side.stages.get("total")]
        medians = [s.median if s else 0.0 for s in stats]
        errors = [[s.median - s.min if s else 0.0 for s in stats], [s.max - s.median if s else 0.0 for s in stats]]
        positions = [i + offset * width for i in range(len(labels))]
        ax.bar(positions, medians, width, yerr=errors, capsize=3, label=f"{side.name} ({side.runs_on})")
    ax.set_xticks([i + width * (len(sides) - 1) / 2 for i in range(len(labels))], labels)
    ax.set_ylabel("seconds (median, min–max)")
    r = result.resolved
    ax.set_title(f"{result.model['id']} {r['width']}×{r['height']}, {r['steps']} steps, batch {r['batch']}")
    ax.legend()
    return fig


def _median(side: Side, stage: str) -> float | None:
    summary = side.stages.get(stage)
    return summary.median if summary else None
