"""`python -m export controlnet SOURCE --for MODEL_DIR`: a ControlNet as an ONNX graph beside the model it serves.

The graph goes to `MODEL_DIR/controlnets/NAME/` and is recorded in MODEL_DIR's manifest (`controlnets`). The
model must have been exported with `--controlnet`, so that its UNet takes the residuals as inputs; the
ControlNet must be of the model's family, with its cross-attention size and residual widths. A node then
offers it to every model of that family it hosts whose UNet takes the same residuals.

The graph takes the UNet's own inputs plus `controlnet_cond` (the control image, RGB in 0..1, at the render's
pixel size) and returns the residuals unscaled, named as the UNet's inputs: the engine scales them per
unit and adds several units up, as diffusers' `controlnet_conditioning_scale` and MultiControlNet do.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from engines import manifest as mf
from engines.errors import EngineError
from export import fullsize, graphs, model_dir, presets, source, tiny
from export.errors import ExportError
from export.exporter import TOLERANCE, ComponentReport, describe, export_graph, versions

log = logging.getLogger("sdserve.export")

FOLDER = "controlnets"  # inside the model directory: FOLDER/NAME/model.onnx
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Preset:
    """A random-weight ControlNet of a random preset's UNet (tests, benchmarks): `from_unet` copies the
    UNet's encoder half; the zero convolutions are drawn from `seed` too, or the residuals would be zeros."""

    name: str
    base: str  # the model preset whose UNet it is made from
    seed: int
    embedding_channels: tuple[int, int, int, int]  # the control image encoder's widths (×8 down)


PRESETS = {p.name: p for p in (
    Preset("tiny-controlnet-sd15", "tiny-sd15", 20, (8, 16, 16, 32)),
    Preset("tiny-controlnet-sdxl", "tiny-sdxl", 23, (8, 16, 16, 32)),
    Preset("random-controlnet-sd15", "random-sd15", 30, (16, 32, 96, 256)),
    Preset("random-controlnet-sdxl", "random-sdxl", 32, (16, 32, 96, 256)),
)}
_FAMILY_NAMES = {"sd1": "an SD 1.x", "sd2": "an SD 2.x", "sdxl": "an SDXL"}
_FULL_SIZE_UNETS = {"random-sd15": fullsize.UNET_SD15, "random-sd21": fullsize.UNET_SD21,
                    "random-sdxl": fullsize.UNET_SDXL}


class ControlNetSettings(msgspec.Struct, frozen=True, kw_only=True):
    source: str  # a preset above, hub id, local diffusers ControlNetModel folder or single .safetensors file
    model_dir: str  # the model directory it is exported for (--for)
    name: str | None = None  # default: the preset, folder or file name, or the hub id's last part
    revision: str | None = None
    config: str | None = None  # for a single file: a diffusers ControlNet config folder or hub id
    force: bool = False  # replace a ControlNet of the same name
    tolerance: float | None = None  # default by the UNet's precision (exporter.TOLERANCE)
    opset: int = 17


class ControlNetReport(msgspec.Struct, frozen=True):
    name: str
    model_dir: str
    family: mf.Family
    component: ComponentReport
    seconds: float


def export_controlnet(settings: ControlNetSettings) -> ControlNetReport:
    started = time.perf_counter()
    root = Path(settings.model_dir)
    manifest = _read(root)
    name = settings.name or default_name(settings.source)
    if not NAME.match(name):
        raise ExportError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (64 at most)")
    if manifest.residuals is None:
        raise ExportError(f"the UNet of {root} takes no ControlNet residuals; export the model again with "
                          "--controlnet (python -m export PRESET --controlnet --output DIR --force)")
    if name in manifest.controlnets and not settings.force:
        raise ExportError(f"{root} already has a ControlNet named {name!r}; pass --force to replace it")
    log.info("loading ControlNet %s", settings.source)
    model, origin = load(settings.source, settings.revision, settings.config)
    check_fits(model, origin, manifest, root)
    unet = manifest.components["unet"]
    tolerance = settings.tolerance if settings.tolerance is not None else TOLERANCE[unet.precision]
    target = unet.optimized_for or "none"
    graph = controlnet_graph(model, _spec(unet, "text_embeds"), _spec(unet, "time_ids"), manifest.vae_scale_factor,
                             fp32_attention=manifest.family == "sd2")
    folder = f"{FOLDER}/{name}"
    log.info("[1/1] controlnet %s", name)
    with model_dir.staging(root / folder, force=True) as stage:
        report = export_graph(graph, stage, _shapes(manifest), unet.precision, target, tolerance, settings.opset)
        model.save_config(stage)
    entry = mf.ControlNet(component=describe(root, folder, unet.precision, target), family=manifest.family,
                          cross_attention_dim=int(model.config.cross_attention_dim),
                          conditioning_channels=int(model.config.conditioning_channels), source=origin,
                          exporter=versions(settings.opset))
    current = _read(root)  # as it is now: another ControlNet may have been added meanwhile
    model_dir.replace_manifest(root, msgspec.structs.replace(current, controlnets={**current.controlnets,
                                                                                    name: entry}))
    return ControlNetReport(name, str(root), manifest.family, report, time.perf_counter() - started)


def default_name(source_name: str) -> str:
    if source_name in PRESETS:
        return source_name
    path = Path(source_name)
    return path.stem if path.suffix in source.SINGLE_FILE_SUFFIXES else path.name


def load(source_name: str, revision: str | None = None, config: str | None = None
         ) -> tuple[ControlNetModel, mf.Source]:
    """The ControlNet from a preset, local folder, single file or hub id, in fp32 eval mode."""
    path = Path(source_name).expanduser()
    if source_name in PRESETS:
        preset = PRESETS[source_name]
        model, origin = random_controlnet(preset), mf.Source(kind="random", id=preset.name, seed=preset.seed)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ExportError(f"{path} is not a diffusers ControlNetModel folder (no config.json)")
        model = source.guarded(path, lambda: ControlNetModel.from_pretrained(path, local_files_only=True))
        origin = mf.Source(kind="folder", id=str(path.resolve()))
    elif path.is_file():
        model, origin = _from_single_file(path, config), mf.Source(kind="single_file", id=path.name,
                                                                   sha256=mf.sha256_file(path))
    elif path.suffix in source.SINGLE_FILE_SUFFIXES or source_name.startswith((".", "/", "~")) \
            or source_name.count("/") != 1:
        raise ExportError(f"no such ControlNet preset, file or folder: {source_name} (presets: {', '.join(PRESETS)})")
    else:
        model = source.from_hub(source_name, revision,
                                lambda: ControlNetModel.from_pretrained(source_name, revision=revision))
        origin = mf.Source(kind="hub", id=source_name, revision=source.hub_commit(source_name, revision))
    if not isinstance(model, ControlNetModel):
        raise ExportError(f"{source_name} is a {type(model).__name__}, not a ControlNetModel")
    if model.dtype != torch.float32:  # a half-precision checkpoint is checked against its fp32 self
        model = model.to(torch.float32)
    return model.eval().requires_grad_(False), origin


def reference(origin: mf.Source) -> ControlNetModel:
    """Rebuild the PyTorch ControlNet a manifest entry was exported from (tests and bench)."""
    if origin.kind == "single_file":
        raise ExportError("single-file sources cannot be rebuilt from the manifest alone; pass the file")
    return load(origin.id, origin.revision)[0]


def _from_single_file(path: Path, config: str | None) -> ControlNetModel:
    if path.suffix not in source.SINGLE_FILE_SUFFIXES:
        raise ExportError(f"{path}: single-file ControlNets end in {' or '.join(source.SINGLE_FILE_SUFFIXES)}")
    kwargs: dict[str, object] = {}
    if config is not None:
        kwargs = {"config": config, "local_files_only": Path(config).is_dir()}
    return source.guarded(path, lambda: ControlNetModel.from_single_file(str(path), **kwargs))


def random_controlnet(preset: Preset) -> ControlNetModel:
    base = presets.get(preset.base)
    with torch.random.fork_rng(devices=[]):
        if base.name in _FULL_SIZE_UNETS:  # the full-size UNet alone: its pipeline's text encoders are large
            torch.manual_seed(base.random_seed or 0)
            unet = UNet2DConditionModel(**_FULL_SIZE_UNETS[base.name])
        else:
            unet = tiny.build(base).unet
        torch.manual_seed(preset.seed)
        model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=preset.embedding_channels)
        for zero in (*model.controlnet_down_blocks, model.controlnet_mid_block,
                     model.controlnet_cond_embedding.conv_out):
            zero.reset_parameters()  # PyTorch's default initialisation instead of diffusers' zeros
    return model.eval().requires_grad_(False)


def family(model: ControlNetModel, origin: mf.Source) -> mf.Family | None:
    """The family a ControlNet was made for: its preset's, else what its config tells (SDXL's added text and
    time embedding; SD 1.x's 768-wide or SD 2.x's 1024-wide cross-attention), else None."""
    if origin.kind == "random":
        return presets.get(PRESETS[origin.id].base).family
    if model.config.addition_embed_type == "text_time":
        return "sdxl"
    return {768: "sd1", 1024: "sd2"}.get(model.config.cross_attention_dim)


def check_fits(model: ControlNetModel, origin: mf.Source, manifest: mf.Manifest, root: Path) -> None:
    """Refuse, in one line, a ControlNet whose residuals the model's UNet cannot add."""
    config, what = model.config, origin.id
    sdxl = config.addition_embed_type == "text_time"
    made_for = family(model, origin)
    if sdxl != (manifest.family == "sdxl") or made_for not in (None, manifest.family):
        raise ExportError(f"{what} is {_FAMILY_NAMES.get(made_for, 'an SD 1.x/2.x')} ControlNet, but {root} is "
                          f"{_FAMILY_NAMES[manifest.family]} model")
    unet = manifest.components["unet"]
    width = _spec(unet, "encoder_hidden_states")[2]
    if config.cross_attention_dim != width:
        raise ExportError(f"{what} has cross-attention size {config.cross_attention_dim}, but the UNet of {root} "
                          f"({manifest.family}) has {width}: it is a ControlNet for another family")
    inputs = {t.name: t for t in unet.inputs}
    theirs = [(r.name, r.channels, r.axes[2]) for r in graphs.residual_specs(config)]
    ours = [(t.name, t.shape[1], t.shape[2]) for n in (*manifest.residuals.down, manifest.residuals.mid)
            if (t := inputs.get(n)) is not None]
    if theirs != ours:
        raise ExportError(f"{what} has {len(theirs)} residuals of widths {[c for _, c, _ in theirs]}, but the UNet "
                          f"of {root} takes {len(ours)} of widths {[c for _, c, _ in ours]}")
    if sdxl:
        expected = _spec(unet, "text_embeds")[1] + _spec(unet, "time_ids")[1] * config.addition_time_embed_dim
        if config.projection_class_embeddings_input_dim != expected:
            raise ExportError(f"{what} embeds {config.projection_class_embeddings_input_dim} pooled-text and time "
                              f"values, the UNet of {root} {expected}")


class _ControlNet(torch.nn.Module):
    def __init__(self, model: ControlNetModel, sdxl: bool) -> None:
        super().__init__()
        self.model, self.sdxl = model, sdxl

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, *added: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs = {"added_cond_kwargs": {"text_embeds": added[0], "time_ids": added[1]}} if self.sdxl else {}
        down, mid = self.model(sample, timestep, encoder_hidden_states, controlnet_cond, return_dict=False, **kwargs)
        return (*down, mid)


def controlnet_graph(model: ControlNetModel, text_embeds: list[int | str] | None, time_ids: list[int | str] | None,
                     scale: int, fp32_attention: bool = False) -> graphs.Graph:
    """The ControlNet with the UNet's inputs (SDXL's pooled text and time ids as the UNet takes them) and the
    control image at `scale` times the latent's size; outputs named as the UNet's residual inputs."""
    config = model.config
    residuals = graphs.residual_specs(config)
    sdxl = text_embeds is not None and time_ids is not None
    spatial = {0: graphs.BATCH, 2: "height", 3: "width"}
    names = ["sample", "timestep", "encoder_hidden_states", "controlnet_cond"]
    axes = {"sample": spatial, "timestep": {0: graphs.BATCH},
            "encoder_hidden_states": {0: graphs.BATCH, 1: "sequence"},
            "controlnet_cond": {0: graphs.BATCH, 2: f"height*{scale}", 3: f"width*{scale}"},
            **{r.name: r.axes for r in residuals}}
    if sdxl:
        names += ["text_embeds", "time_ids"]
        axes |= {"text_embeds": {0: graphs.BATCH}, "time_ids": {0: graphs.BATCH}}

    def make(shape: graphs.Shape, gen: torch.Generator) -> dict[str, torch.Tensor]:
        b, h, w = shape.batch, shape.latent_height, shape.latent_width
        inputs = {
            "sample": torch.randn(b, config.in_channels, h, w, generator=gen),
            "timestep": torch.rand(b, generator=gen) * 999,
            "encoder_hidden_states": torch.randn(b, shape.sequence, config.cross_attention_dim, generator=gen),
            "controlnet_cond": torch.rand(b, config.conditioning_channels, h * scale, w * scale, generator=gen),
        }
        if sdxl:
            inputs["text_embeds"] = torch.randn(b, text_embeds[1], generator=gen)
            size = [h * scale, w * scale, 0, 0, h * scale, w * scale][:time_ids[1]]
            inputs["time_ids"] = torch.tensor([size] * b, dtype=torch.float32)
        return inputs

    return graphs.Graph("controlnet", _ControlNet(model, sdxl), names, [r.name for r in residuals], axes, make,
                        keep_fp32_inputs=("timestep", "time_ids"),
                        fp32_attention=fp32_attention or bool(getattr(config, "upcast_attention", False)))


def _read(root: Path) -> mf.Manifest:
    if not (root / mf.MANIFEST_FILE).is_file():
        raise ExportError(f"{root} is not a model directory (no {mf.MANIFEST_FILE}); export the model first")
    try:
        return mf.read(root, verify=False)
    except EngineError as exc:
        raise ExportError(str(exc)) from exc


def _spec(component: mf.Component, name: str) -> list[int | str] | None:
    return next((t.shape for t in component.inputs if t.name == name), None)


def _shapes(manifest: mf.Manifest) -> tuple[graphs.Shape, graphs.Shape]:
    """As the model's own graphs: traced at batch 2 and the smallest size, checked at batch 1 and a
    non-square size."""
    scale, step = manifest.vae_scale_factor, manifest.sizes.step
    small = max(manifest.sizes.min, step) // scale
    return graphs.Shape(2, small, small), graphs.Shape(1, small + step // scale, small)
