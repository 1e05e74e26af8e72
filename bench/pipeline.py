"""`bench pipeline`: the engines against the diffusers reference, same weights and settings, one run.

Every side renders from the same starting latents at the same size, steps, sampler, guidance and
prompt: the engines on each backend asked for (`--backend cpu,openvino,openvino:fp32`, with each decoder
of `--decoder full,tiny`), and PyTorch at each precision (`--precision fp32,bf16`, bf16 being
`torch.autocast`). After a warm-up of each, the repetitions go round all sides, each repetition starting
one side later, so that drift in the machine's speed falls on all alike.

Memory is the growth of the process's resident set (and of the GPU's used memory) from just before
a side is loaded to the peak of its load and warm-up: all sides share one process, so only that
window belongs to one side alone (`bench.sides` says which sides share a loaded pipeline).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from bench import hardware, report
from bench.errors import BenchError
from bench.sides import STAGES, Contender, Job, Side, engines_sides, reference_sides
from bench.stats import Summary, summarize
from engines import manifest as mf

NOISY_SAMPLERS = ("euler_a", "lcm")  # draw noise every step: the sides' images differ by design
DECODERS = ("full", "tiny")
PRECISIONS = ("fp32", "fp16", "bf16")

__all__ = ["STAGES", "PipelineResult", "PipelineSettings", "Side", "run"]


class Drift(msgspec.Struct, frozen=True):
    """How far one side's pixels are from the baseline's, on a 0–1 scale: the largest difference of any pixel
    in any repetition, and the mean difference (the mean of the repetitions' means)."""

    max: float
    mean: float


class PipelineSettings(msgspec.Struct, frozen=True, kw_only=True):
    model_dir: str
    # engines backends, "openvino:fp32" / "openvino:bf16" for its precision
    backends: list[str] = msgspec.field(default_factory=lambda: ["auto"])
    # the engines' final decoders: full (the VAE) and/or tiny (the model's TAESD)
    decoders: list[str] = msgspec.field(default_factory=lambda: ["full"])
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
    precisions: list[str] = []  # the reference's (fp32, fp16, bf16 = autocast); default: the exported UNet's
    checkpoint: str | None = None  # rebuild the reference from this instead of the manifest's source
    prompt: str = "a photograph of an astronaut riding a horse on the moon, detailed, 35mm"
    seed: int = 0
    lora_dir: str | None = None  # LoRA adapters for the engines' side
    lora: list[tuple[str, float]] = []  # (name, scale) applied to every engines render


class PipelineResult(msgspec.Struct, kw_only=True):
    kind: str = "pipeline"
    started: str
    settings: PipelineSettings
    model: dict[str, Any]
    resolved: dict[str, Any]  # size, steps, sampler, guidance actually used
    hardware: hardware.Hardware
    versions: dict[str, str]
    sides: list[Side]  # the engines' sides, then the reference's
    # per engines side and reference side, "engines X / PyTorch Y": the time ratio of each repetition
    ratios: dict[str, Summary] = {}
    # |side - baseline| over every pixel of every repetition, the baseline being the first reference side;
    # empty without a reference or for samplers that draw fresh noise each step (euler_a, lcm)
    pixel_diffs: dict[str, Drift] = {}

    def of(self, kind: str) -> list[Side]:
        return [side for side in self.sides if side.kind == kind]


def run(settings: PipelineSettings, progress: Callable[[str], None] | None = None) -> PipelineResult:
    """Load every side, warm each up, run the repetitions round all sides, and summarise."""
    tick = progress or (lambda _label: None)
    check(settings)
    root = Path(settings.model_dir)
    started = report.now()
    manifest = mf.read(root)
    job = _job(settings, manifest)
    contenders = engines_sides(root, job, settings.backends, settings.decoders, settings.threads, settings.lora_dir,
                               settings.lora, settings.warmup, tick)
    if settings.reference:
        contenders += reference_sides(root, manifest, job, _precisions(settings, manifest), settings.reference_device,
                                      settings.checkpoint, settings.threads, settings.warmup, tick)
    ratios, diffs = _round_robin(contenders, settings.repeat, tick)
    if job.sampler in NOISY_SAMPLERS:
        diffs = {}
    return PipelineResult(
        started=started, settings=settings,
        model={"id": root.name, "name": manifest.name, "family": manifest.family, "variant": manifest.variant,
               "precision": manifest.components["unet"].precision, "source": manifest.source.kind},
        resolved={"width": job.width, "height": job.height, "steps": job.steps, "sampler": job.sampler,
                  "guidance_scale": job.guidance_scale, "batch": settings.batch},
        hardware=hardware.describe(),
        versions=hardware.versions("sdserve", "onnxruntime", "onnxruntime-gpu", "openvino", "numpy", "torch",
                                   "diffusers", "transformers", "tensorrt"),
        sides=[c.side() for c in contenders], ratios={k: s for k, v in ratios.items() if (s := summarize(v))},
        pixel_diffs=diffs,
    )


def check(settings: PipelineSettings) -> None:
    """Counts and names that would leave nothing to report fail before any work."""
    if settings.repeat < 1 or settings.batch < 1 or settings.warmup < 0:
        raise BenchError("--repeat and --batch must be at least 1, --warmup at least 0")
    if settings.threads is not None and settings.threads < 1:
        raise BenchError("--threads must be at least 1")
    if settings.lora and settings.reference:
        raise BenchError("--lora times the engines alone: add --no-reference")
    if not settings.backends or not settings.decoders:
        raise BenchError("--backend and --decoder need at least one value each")
    if unknown := [d for d in settings.decoders if d not in DECODERS] or \
            [p for p in settings.precisions if p not in PRECISIONS]:
        raise BenchError(f"unknown --decoder or --precision {', '.join(unknown)}: decoders are {', '.join(DECODERS)}, "
                         f"precisions {', '.join(PRECISIONS)}")


def total_runs(settings: PipelineSettings) -> int:
    sides = len(settings.backends) * len(settings.decoders) + (len(settings.precisions or [""])
                                                               if settings.reference else 0)
    return sides * (settings.warmup + settings.repeat)


def _job(settings: PipelineSettings, manifest: mf.Manifest) -> Job:
    d = manifest.defaults
    width, height = settings.width or d.width, settings.height or d.height
    scale = manifest.vae_scale_factor
    latents = np.random.default_rng(settings.seed).standard_normal(
        (settings.batch, manifest.latent_channels, height // scale, width // scale), dtype=np.float32)
    guidance = settings.guidance_scale if settings.guidance_scale is not None else d.guidance_scale
    return Job(width=width, height=height, steps=settings.steps or d.steps, sampler=settings.sampler or d.sampler,
               guidance_scale=guidance, latents=latents, prompt=settings.prompt, seed=settings.seed)


def _precisions(settings: PipelineSettings, manifest: mf.Manifest) -> list[str]:
    return list(settings.precisions) or [manifest.components["unet"].precision]


def _round_robin(contenders: list[Contender], repeat: int, tick: Callable[[str], None]
                 ) -> tuple[dict[str, list[float]], dict[str, Drift]]:
    """The measured repetitions, each starting one side later than the last; per repetition the time ratio of
    each engines side to each reference side, and each side's pixel difference to the first reference side
    (the baseline)."""
    ratios: dict[str, list[float]] = {}
    diffs: dict[str, list[np.ndarray]] = {}
    baseline = next((c.name for c in contenders if c.kind == "reference"), None)
    for index in range(repeat):
        shift = index % len(contenders)
        outputs = {}
        for contender in contenders[shift:] + contenders[:shift]:
            outputs[contender.name] = contender.measure()
            tick(f"{contender.name} {index + 1}/{repeat}")
        for ours in (c for c in contenders if c.kind == "engines"):
            for theirs in (c for c in contenders if c.kind == "reference"):
                ratios.setdefault(f"{ours.name} / {theirs.name}", []).append(
                    outputs[ours.name][0] / outputs[theirs.name][0])
        for name, (_, pixels) in outputs.items():
            if baseline is not None and name != baseline:
                diffs.setdefault(name, []).append(np.abs(pixels - outputs[baseline][1]))
    drift = {name: Drift(max=float(max(d.max() for d in found)), mean=float(np.mean([d.mean() for d in found])))
             for name, found in diffs.items()}
    return ratios, drift


def markdown(result: PipelineResult) -> str:
    r = result.resolved
    head = (f"**{result.model['id']}** ({result.model['family']}/{result.model['variant']}, "
            f"{result.model['precision']}), {r['width']}×{r['height']}, {r['steps']} steps, {r['sampler']}, "
            f"guidance {r['guidance_scale']}, batch {r['batch']}; {result.settings.repeat} repetitions after "
            f"{result.settings.warmup} warm-up; {result.hardware.cpu} ({result.hardware.cores} cores)"
            + "".join(f", {g.name}" for g in result.hardware.gpus) + f"; {result.started}")
    rows = []
    for side in result.sides:
        total = side.stages["total"]
        rows.append([side.name, side.runs_on, total.median, total.min, total.max,
                     _median(side, "text_encoder"), side.unet_step.median if side.unet_step else None,
                     _median(side, "vae_decoder"), side.load_seconds, side.memory_mb, side.device_memory_mb,
                     *_drift(result.pixel_diffs.get(side.name))])
    lines = [head, "", report.table(
        ["side", "runs on", "total s (median)", "min", "max", "text enc. s", "UNet step s", "VAE dec. s",
         "load s", "RAM MiB", "VRAM MiB", "pixel diff max /255", "mean /255"], rows)]
    if result.ratios:
        lines += ["", report.table(["time ratio (per repetition)", "median", "min", "max"],
                                   [[pair, s.median, s.min, s.max] for pair, s in result.ratios.items()])]
    baseline = next((side.name for side in result.sides if side.kind == "reference"), None)
    noisy = "not compared: the sampler draws its own noise each step" if not result.pixel_diffs else ""
    lines += ["", f"UNet step: the UNet call, the guidance mix and the sampler step; VAE dec.: the final decoder; RAM/"
                  f"VRAM: growth from loading through the warm-up; pixel diff: against {baseline}, on 0–255"
                  + (f" ({noisy})" if noisy and baseline else "")]
    return "\n".join(lines)


def figure(result: PipelineResult) -> Any:
    """Median seconds per stage, side by side, with min–max whiskers."""
    fig, ax = report.new_figure()
    labels = ["text encoder", "UNet step", "VAE decoder", "total"]
    width = 0.8 / len(result.sides)
    for offset, side in enumerate(result.sides):
        stats = [side.stages.get("text_encoder"), side.unet_step, side.stages.get("vae_decoder"),
                 side.stages.get("total")]
        medians = [s.median if s else 0.0 for s in stats]
        errors = [[s.median - s.min if s else 0.0 for s in stats], [s.max - s.median if s else 0.0 for s in stats]]
        positions = [i + offset * width for i in range(len(labels))]
        ax.bar(positions, medians, width, yerr=errors, capsize=3, label=f"{side.name} ({side.runs_on})")
    ax.set_xticks([i + width * (len(result.sides) - 1) / 2 for i in range(len(labels))], labels)
    ax.set_ylabel("seconds (median, min–max)")
    r = result.resolved
    ax.set_title(f"{result.model['id']} {r['width']}×{r['height']}, {r['steps']} steps, batch {r['batch']}")
    ax.legend(fontsize="small")
    return fig


def _drift(drift: Drift | None) -> list[float | None]:
    return [None, None] if drift is None else [drift.max * 255, drift.mean * 255]


def _median(side: Side, stage: str) -> float | None:
    summary = side.stages.get(stage)
    return summary.median if summary else None
