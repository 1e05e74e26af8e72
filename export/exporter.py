"""`export_model`: a checkpoint in, a verified model directory out.

Stages: load the pipeline → for each component trace an ONNX graph and check it against PyTorch →
write tokenizers, configs and the manifest → rename the staged folder into place.
"""

from __future__ import annotations

import logging
import math
import time
from importlib import metadata
from pathlib import Path

import msgspec
import onnx
from diffusers import DiffusionPipeline

from engines import manifest as mf
from export import graphs, lora, model_dir, optimize, presets, source, tiny_decoder, verify
from export.errors import ExportError
from export.optimize import Choice as OptimizeChoice
from export.optimize import Target as OptimizeTarget
from export.presets import Preset

log = logging.getLogger("sdserve.export")

TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}  # max |onnx - torch| relative to max(1, max |torch|)


class ExportSettings(msgspec.Struct, frozen=True, kw_only=True):
    preset: str
    model: str | None = None  # hub id, local diffusers folder or single-file checkpoint
    revision: str | None = None
    config: str | None = None  # diffusers config folder or hub id for single-file checkpoints
    output: str | None = None  # default models/<preset>
    precision: mf.Precision = "fp32"
    vae_precision: mf.Precision = "fp32"  # the SDXL VAE overflows in fp16: fp32 unless asked
    opset: int = 17
    force: bool = False
    tolerance: float | None = None  # default by precision (TOLERANCE)
    lora_rank: int = 0  # > 0: LoRA-capable text encoders and UNet, up to this total rank per request
    optimize: OptimizeChoice = "auto"  # ONNX Runtime's transformer fusions for this provider (export.optimize)
    tiny_decoder: str | None = None  # TAESD beside the VAE: "auto", "random", a hub id or folder (export.tiny_decoder)
    controlnet: bool = False  # the UNet takes ControlNet residuals as inputs (zeros when a render has none)


class ComponentReport(msgspec.Struct, frozen=True):
    name: str
    precision: str
    bytes: int
    seconds: float
    max_diff: float
    tolerance: float


class ExportReport(msgspec.Struct, frozen=True):
    output: str
    manifest: mf.Manifest
    components: list[ComponentReport]
    seconds: float


def export_model(settings: ExportSettings) -> ExportReport:
    started = time.perf_counter()
    preset = presets.get(settings.preset)
    if settings.opset < 14:
        raise ExportError("--opset must be 14 or newer (the attention layers need it)")
    target = output_dir(settings)
    if target.exists() and not settings.force:
        raise ExportError(f"{target} already exists; pass --force to replace it")
    tiny, tiny_record = None, None
    if settings.tiny_decoder is not None:  # first: the small download fails sooner than the big one
        tiny, tiny_source = tiny_decoder.load(settings.tiny_decoder, preset)
        tiny_record = tiny_decoder.record(tiny, tiny_source)
    log.info("loading %s", settings.model or preset.hub_id or f"{preset.name} (random weights)")
    pipe, origin = source.load(preset, settings.model, settings.revision, settings.config)
    if settings.lora_rank < 0:
        raise ExportError("--lora-rank must be 0 (no LoRA support) or more")
    parts = component_graphs(pipe, settings.lora_rank, fp32_attention=preset.family == "sd2",
                             controlnet=settings.controlnet)
    graphs_to_export = [*parts, *([tiny_decoder.graph(tiny)] if tiny is not None else [])]
    reports = []
    with model_dir.staging(target, settings.force) as stage:
        for index, graph in enumerate(graphs_to_export, 1):
            log.info("[%d/%d] %s", index, len(graphs_to_export), graph.name)
            reports.append(_export_component(graph, stage, settings, pipe, preset))
        log.info("writing tokenizers, configs and %s", mf.MANIFEST_FILE)
        model_dir.write_configs(pipe, stage, [g.name for g in parts])
        if tiny is not None:
            tiny.save_config(stage / tiny_decoder.COMPONENT)
        manifest = msgspec.structs.replace(_manifest(pipe, preset, origin, stage, settings), tiny_decoder=tiny_record)
        model_dir.write_manifest(stage, manifest)
    return ExportReport(str(target), manifest, reports, time.perf_counter() - started)


def output_dir(settings: ExportSettings) -> Path:
    """Where the model directory goes: --output, else models/<preset>."""
    return Path(settings.output or f"models/{settings.preset}")


def component_graphs(pipe: DiffusionPipeline, lora_rank: int = 0, fp32_attention: bool = False,
                     controlnet: bool = False) -> list[graphs.Graph]:
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    parts = [graphs.text_encoder("text_encoder", pipe.text_encoder)]
    if text_encoder_2 is not None:
        parts.append(graphs.text_encoder("text_encoder_2", text_encoder_2))
    pooled_dim = text_encoder_2.config.projection_dim if text_encoder_2 is not None else None
    parts.append(graphs.unet(pipe.unet, pooled_dim, fp32_attention, controlnet))
    if lora_rank:
        parts = [lora.with_lora(graph, getattr(pipe, graph.name)) for graph in parts]
    parts.append(graphs.vae_encoder(pipe.vae, _vae_scale(pipe)))
    parts.append(graphs.vae_decoder(pipe.vae))
    return parts


def _export_component(graph: graphs.Graph, stage: Path, settings: ExportSettings, pipe: DiffusionPipeline,
                      preset: Preset) -> ComponentReport:
    precision = _precision(graph.name, settings)
    tolerance = settings.tolerance if settings.tolerance is not None else TOLERANCE[precision]
    target = optimize.choose(settings.optimize, settings.precision)
    return export_graph(graph, stage / graph.name, _shapes(pipe, preset), precision, target, tolerance,
                        settings.opset)


def export_graph(graph: graphs.Graph, folder: Path, shapes: tuple[graphs.Shape, graphs.Shape], precision: str,
                 target: OptimizeTarget, tolerance: float, opset: int) -> ComponentReport:
    """Trace `graph` into `folder` at the first shape and check it against PyTorch at the second."""
    started = time.perf_counter()
    trace_shape, check_shape = shapes
    # An fp16 graph is judged against the fp32 PyTorch module.
    check_inputs = graph.inputs(check_shape, seed=1)
    reference = graph.run(check_inputs)
    graphs.trace(graph, graph.inputs(trace_shape, seed=0), folder, opset, precision, target)
    size = sum(f.stat().st_size for f in folder.iterdir())
    if _optimized_for(folder, target) == "cuda":  # fused operators without CPU kernels: nothing here runs it
        log.info("    %s: %.1f MB, optimized for CUDA: not checked against PyTorch (the CPU provider cannot run "
                 "its fused operators; export --optimize cpu or none to check)", graph.name, size / 1e6)
        return ComponentReport(graph.name, precision, size, round(time.perf_counter() - started, 2), math.nan,
                               tolerance)
    worst, scale = verify.max_difference(folder / "model.onnx", check_inputs, reference)
    seconds = time.perf_counter() - started
    log.info("    %s: %.1f MB in %.1f s, max |onnx - torch| = %.2g (output scale %.3g)",
             graph.name, size / 1e6, seconds, worst, scale)
    if worst > tolerance * max(1.0, scale):
        raise ExportError(f"{graph.name}: ONNX output differs from PyTorch by {worst:.3g}, over the tolerance "
                          f"{tolerance:g} × {max(1.0, scale):.3g}")
    return ComponentReport(graph.name, precision, size, round(seconds, 2), worst, tolerance)


def _shapes(pipe: DiffusionPipeline, preset: Preset) -> tuple[graphs.Shape, graphs.Shape]:
    """Trace at batch 2 and the smallest size; check at batch 1 and a non-square size, so that the
    dynamic axes are exercised."""
    scale = _vae_scale(pipe)
    step = _size_step(pipe)
    small = max(preset.sizes.min, step) // scale
    return graphs.Shape(2, small, small), graphs.Shape(1, small + step // scale, small)


def _vae_scale(pipe: DiffusionPipeline) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def _size_step(pipe: DiffusionPipeline) -> int:
    """Pixels per size step: the latent must halve evenly at every UNet down block."""
    return _vae_scale(pipe) * 2 ** (len(pipe.unet.config.down_block_types) - 1)


def _manifest(pipe: DiffusionPipeline, preset: Preset, origin: mf.Source, stage: Path,
              settings: ExportSettings) -> mf.Manifest:
    # The preset's step (64 for the real families, as the API promises) or the UNet's own, if coarser.
    step = math.lcm(_size_step(pipe), preset.sizes.step)
    sizes = mf.Sizes(min=-(-preset.sizes.min // step) * step, max=preset.sizes.max // step * step, step=step)
    tokenizers = {name: _tokenizer(getattr(pipe, name), stage / name, stage)
                  for name in ("tokenizer", "tokenizer_2") if getattr(pipe, name, None) is not None}
    components = {}
    for folder in sorted(p for p in stage.iterdir() if (p / "model.onnx").is_file()):
        components[folder.name] = _component(stage, folder.name, settings)
    return mf.Manifest(
        name=preset.name,
        family=preset.family,
        variant=preset.variant,
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        defaults=preset.defaults,
        sizes=sizes,
        max_batch=preset.max_batch,
        unet_in_channels=pipe.unet.config.in_channels,
        latent_channels=pipe.vae.config.latent_channels,
        vae_scale_factor=_vae_scale(pipe),
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
        requires_aesthetics_score=bool(pipe.config.get("requires_aesthetics_score", False)),
        text_encoders=_text_encoders(pipe),
        components=components,
        tokenizers=tokenizers,
        scheduler=mf.file_ref(stage, "scheduler/scheduler_config.json"),
        source=origin,
        exporter=versions(settings.opset),
        lora=mf.LoraSupport(rank=settings.lora_rank, layers_per_block=pipe.unet.config.layers_per_block)
        if settings.lora_rank else None,
        residuals=_residuals(pipe) if settings.controlnet else None,
    )


def _residuals(pipe: DiffusionPipeline) -> mf.Residuals:
    *down, mid = (r.name for r in graphs.residual_specs(pipe.unet.config))
    return mf.Residuals(down=down, mid=mid)


def _text_encoders(pipe: DiffusionPipeline) -> list[mf.TextEncoder]:
    if getattr(pipe, "text_encoder_2", None) is None:
        # SD 1.x and 2.x condition on the final layer (SD 2's config already drops OpenCLIP's last layer).
        return [mf.TextEncoder("text_encoder", "tokenizer", "last_hidden_state")]
    # SDXL conditions on both encoders' penultimate layers and the second encoder's pooled projection.
    penultimate = [f"hidden_states.{m.config.num_hidden_layers - 1}" for m in (pipe.text_encoder, pipe.text_encoder_2)]
    return [mf.TextEncoder("text_encoder", "tokenizer", penultimate[0]),
            mf.TextEncoder("text_encoder_2", "tokenizer_2", penultimate[1], pooled_output="text_embeds")]


def _tokenizer(tokenizer: object, folder: Path, stage: Path) -> mf.Tokenizer:
    name = model_dir.write_tokenizer(tokenizer, folder)
    return mf.Tokenizer(
        file=mf.file_ref(stage, f"{folder.name}/{name}"),
        max_length=int(tokenizer.model_max_length),
        bos_id=int(tokenizer.bos_token_id),
        eos_id=int(tokenizer.eos_token_id),
        pad_id=int(tokenizer.pad_token_id),
    )


def _component(stage: Path, name: str, settings: ExportSettings) -> mf.Component:
    precision = _precision(name, settings)
    return describe(stage, name, precision, optimize.choose(settings.optimize, settings.precision))


def describe(root: Path, folder: str, precision: mf.Precision, target: OptimizeTarget) -> mf.Component:
    """The manifest entry of the graph in `root/folder`, its paths relative to `root`."""
    model = onnx.load(str(root / folder / "model.onnx"), load_external_data=False)
    data = root / folder / graphs.EXTERNAL_DATA_FILE
    return mf.Component(
        graph=mf.file_ref(root, f"{folder}/model.onnx"),
        external_data=mf.file_ref(root, f"{folder}/{data.name}") if data.is_file() else None,
        precision=precision,
        optimized_for=_optimized_for(root / folder, target),
        inputs=[_tensor_spec(v) for v in model.graph.input],
        outputs=[_tensor_spec(v) for v in model.graph.output],
    )


def _precision(component: str, settings: ExportSettings) -> mf.Precision:
    """The VAE (and the tiny decoder beside it) keeps fp32 in fp16 exports unless asked (SDXL's overflows)."""
    decoder = component.startswith("vae_") or component == tiny_decoder.COMPONENT
    return settings.vae_precision if decoder else settings.precision


def _optimized_for(folder: Path, target: OptimizeTarget) -> mf.OptimizedFor | None:
    """What the graph was optimized for: "cuda" only where a CUDA-only operator was fused in (a text
    encoder optimized for CUDA holds none, and runs anywhere as a "cpu" graph does)."""
    if target == "none":
        return None
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return "cuda" if optimize.needs_cuda(model) else "cpu"


def _tensor_spec(value: onnx.ValueInfoProto) -> mf.TensorSpec:
    tensor = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    shape: list[int | str] = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    return mf.TensorSpec(value.name, dtype, shape)


def versions(opset: int) -> dict[str, str]:
    names = {"sdserve": ["sdserve"], "torch": ["torch"], "diffusers": ["diffusers"],
             "transformers": ["transformers"], "onnx": ["onnx"], "onnxruntime": ["onnxruntime", "onnxruntime-gpu"]}
    versions = {name: _version(dists) for name, dists in names.items()}
    return versions | {"opset": str(opset)}


def _version(distributions: list[str]) -> str:
    for dist in distributions:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"
