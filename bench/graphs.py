"""`bench graphs`: one model's graphs alone (the UNet, the decoders) on each backend, same inputs, one run.

Each side is a component on a backend (`cpu` is ONNX Runtime fp32; `openvino:fp32`, `openvino:bf16`).
The UNet is fed the inputs of every step of a real schedule (the latents scaled for the sampler at each
timestep, guided: two rows); a decoder, latents of the render size. The sides of a component are loaded
together, then each repetition runs every side over every input, starting one side later each time. For
each side: the median seconds per call, and per input the relative error of its output against the first
side's (mean |output - first| / mean |first|): for the UNet, the drift each step's prediction suffers.
`vae_decoder:tiled` is the VAE decoder called in the engines' overlapping tiles (`engines.vae_tiling`) at any
size, to show what tiling costs against the whole decode.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from bench import hardware, report
from bench.errors import BenchError
from bench.stats import Summary, summarize
from engines import manifest as mf
from engines import schedulers, vae_tiling
from engines.backends import Session, open_component

COMPONENTS = ("unet", "vae_decoder", "vae_decoder:tiled", "tiny_vae_decoder")
TILED = ":tiled"


class GraphSettings(msgspec.Struct, frozen=True, kw_only=True):
    model_dir: str
    components: list[str] = msgspec.field(default_factory=lambda: ["unet", "vae_decoder"])
    backends: list[str] = msgspec.field(default_factory=lambda: ["cpu", "openvino:fp32", "openvino:bf16"])
    width: int | None = None  # default: the model's native size
    height: int | None = None
    steps: int = 4  # UNet inputs: the timesteps of a schedule of this many steps
    sampler: str = "euler"
    rows: int = 2  # UNet rows per call (2: one guided image)
    threads: int | None = None
    repeat: int = 3
    seed: int = 0


class GraphSide(msgspec.Struct, kw_only=True):
    component: str
    backend: str
    runs_on: str
    load_seconds: float
    call: Summary  # seconds per call
    errors: list[float]  # per input (UNet: per step), relative to the first side's output


class GraphResult(msgspec.Struct, kw_only=True):
    kind: str = "graphs"
    started: str
    settings: GraphSettings
    model: str
    resolved: dict[str, Any]
    hardware: hardware.Hardware
    versions: dict[str, str]
    sides: list[GraphSide]


def run(settings: GraphSettings, progress: Callable[[str], None] | None = None) -> GraphResult:
    tick = progress or (lambda _label: None)
    root = Path(settings.model_dir)
    manifest = mf.read(root)
    check(settings, manifest)
    width, height = settings.width or manifest.defaults.width, settings.height or manifest.defaults.height
    sides = []
    for component in settings.components:
        feeds = _inputs(manifest, component, settings, width, height)
        sides += _measure(root, manifest, component, feeds, settings, tick)
    return GraphResult(started=report.now(), settings=settings, model=root.name,
                       resolved={"width": width, "height": height, "inputs per call": settings.rows},
                       hardware=hardware.describe(), versions=hardware.versions("onnxruntime", "openvino", "numpy"),
                       sides=sides)


def check(settings: GraphSettings, manifest: mf.Manifest) -> None:
    if settings.repeat < 1 or settings.steps < 1 or settings.rows < 1:
        raise BenchError("--repeat, --steps and --rows must be at least 1")
    missing = [c for c in settings.components
               if c not in COMPONENTS or c.removesuffix(TILED) not in manifest.components]
    if missing:
        raise BenchError(f"components {', '.join(missing)}: this model has {', '.join(manifest.components)}; "
                         f"bench graphs times {', '.join(COMPONENTS)}")


def total_runs(settings: GraphSettings) -> int:
    per_component = {"unet": settings.steps}
    return settings.repeat * len(settings.backends) * sum(per_component.get(c, 1) for c in settings.components)


def _inputs(manifest: mf.Manifest, component: str, settings: GraphSettings, width: int, height: int
            ) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(settings.seed)
    scale = manifest.vae_scale_factor
    latent = (manifest.latent_channels, height // scale, width // scale)
    if component != "unet":
        return [{"latent_sample": rng.standard_normal((1, *latent), dtype=np.float32)}]
    spec = {t.name: t.shape for t in manifest.components["unet"].inputs}
    if manifest.unet_in_channels != manifest.latent_channels or "text_embeds" in spec:
        raise BenchError("bench graphs feeds SD 1.x/2.x text-to-image UNets (4 channels, one text encoder)")
    scheduler = schedulers.create(settings.sampler, msgspec.json.decode((Path(settings.model_dir) /
                                                                         manifest.scheduler.path).read_bytes()))
    schedule = scheduler.schedule(settings.steps)
    x = rng.standard_normal((settings.rows, *latent), dtype=np.float32) * schedule.init_noise_sigma
    text = rng.standard_normal((settings.rows, 77, int(spec["encoder_hidden_states"][2])), dtype=np.float32)
    return [{"sample": scheduler.scale_model_input(schedule, i, x).astype(np.float32),
             "timestep": np.full(settings.rows, t, np.float32), "encoder_hidden_states": text}
            for i, t in enumerate(schedule.timesteps)]


def _measure(root: Path, manifest: mf.Manifest, component: str, feeds: list[dict[str, np.ndarray]],
             settings: GraphSettings, tick: Callable[[str], None]) -> list[GraphSide]:
    opened: list[tuple[str, Session, float]] = []
    graph = component.removesuffix(TILED)
    for spec in settings.backends:
        backend, _, precision = spec.partition(":")
        begun = time.perf_counter()
        opened.append((spec, open_component(root, manifest, graph, backend, settings.threads, precision or "auto"),
                       time.perf_counter() - begun))
    output = manifest.components[graph].outputs[0].name
    call = _tiled if component.endswith(TILED) else _whole
    for _, session, _ in opened:  # warm-up: the first call allocates and, for OpenVINO, finishes compiling
        call(session, feeds[0], output, manifest.vae_scale_factor)
    times: dict[str, list[float]] = {spec: [] for spec, _, _ in opened}
    outputs: dict[str, list[np.ndarray]] = {}
    for index in range(settings.repeat):
        shift = index % len(opened)
        for spec, session, _ in opened[shift:] + opened[:shift]:
            outputs[spec] = []
            for feed in feeds:
                begun = time.perf_counter()
                outputs[spec].append(call(session, feed, output, manifest.vae_scale_factor))
                times[spec].append(time.perf_counter() - begun)
                tick(f"{component} {spec} {index + 1}/{settings.repeat}")
    first = outputs[opened[0][0]]
    sides = [GraphSide(component=component, backend=spec, runs_on=spec, load_seconds=loaded,
                       call=summarize(times[spec]),
                       errors=[float(np.abs(o - f).mean() / np.abs(f).mean()) for o, f in zip(outputs[spec], first,
                                                                                               strict=True)])
             for spec, _, loaded in opened]
    for _, session, _ in opened:
        session.close()
    return sides


def _whole(session: Session, feed: dict[str, np.ndarray], output: str, _scale: int) -> np.ndarray:
    return session.run(feed, [output])[output]


def _tiled(session: Session, feed: dict[str, np.ndarray], output: str, scale: int) -> np.ndarray:
    return vae_tiling.decode(lambda z: session.run({"latent_sample": z}, [output])[output], feed["latent_sample"],
                             scale, threshold=0)


def markdown(result: GraphResult) -> str:
    r = result.resolved
    head = (f"**{result.model}** graphs alone at {r['width']}×{r['height']} (UNet: {r['inputs per call']} rows, "
            f"{result.settings.steps} {result.settings.sampler} steps); {result.settings.repeat} repetitions; "
            f"{result.hardware.cpu} ({result.hardware.cores} cores); {result.started}")
    rows, baselines = [], {}
    for side in result.sides:
        base = baselines.setdefault(side.component, side.call.median)
        rows.append([side.component, side.backend, side.call.median, side.call.min, side.call.max,
                     side.call.median / base, " / ".join(f"{e:.1e}" for e in side.errors)])
    return "\n".join([head, "", report.table(
        ["graph", "backend", "s per call (median)", "min", "max", "time vs first", "relative error per input"], rows),
        "", "relative error: mean |output − first backend's| / mean |first backend's|, per input (UNet: per step)"])


def figure(result: GraphResult) -> Any:
    fig, ax = report.new_figure()
    labels = [f"{s.component}\n{s.backend}" for s in result.sides]
    calls = [side.call for side in result.sides]
    ax.bar(range(len(labels)), [c.median for c in calls],
           yerr=[[c.median - c.min for c in calls], [c.max - c.median for c in calls]], capsize=3)
    ax.set_xticks(range(len(labels)), labels, fontsize="small")
    ax.set_ylabel("seconds per call (median, min–max)")
    ax.set_title(f"{result.model} {result.resolved['width']}×{result.resolved['height']}")
    return fig
