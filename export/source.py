"""Loading a checkpoint into a diffusers pipeline: hub id, local diffusers folder or single file.

The same code rebuilds the PyTorch reference from a manifest's `source` (bench, tests), so that the
reference always runs the weights that were exported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from engines.manifest import Source, sha256_file
from export import fullsize, presets, tiny
from export.errors import ExportError
from export.presets import Preset

log = logging.getLogger("sdserve.export")

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
T = TypeVar("T")


def pipeline_class(preset: Preset) -> type[DiffusionPipeline]:
    if preset.family == "sdxl":
        return StableDiffusionXLInpaintPipeline if preset.variant == "inpaint" else StableDiffusionXLPipeline
    return StableDiffusionInpaintPipeline if preset.variant == "inpaint" else StableDiffusionPipeline


def load(preset: Preset, model: str | None = None, revision: str | None = None,
         config: str | None = None) -> tuple[DiffusionPipeline, Source]:
    """The pipeline for `preset` from `model` (default: the preset's own source), in fp32 eval mode."""
    if model is None and preset.is_random:
        return random_pipeline(preset), Source(kind="random", id=preset.name, seed=preset.random_seed)
    model = model or preset.hub_id
    if model is None:
        raise ExportError(f"preset {preset.name!r} has no default source; pass --model")
    path = Path(model).expanduser()
    if path.is_dir():
        pipe, source = _from_folder(preset, path), Source(kind="folder", id=str(path.resolve()))
    elif path.is_file():
        pipe, source = _from_single_file(preset, path, config), Source(
            kind="single_file", id=path.name, sha256=sha256_file(path)
        )
    elif path.suffix in SINGLE_FILE_SUFFIXES or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ExportError(f"no such checkpoint file or folder: {model}")
    else:
        pipe = _from_hub(preset, model, revision)
        source = Source(kind="hub", id=model, revision=hub_commit(model, revision))
    _check_family(preset, pipe, model)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.to(torch.float32).eval().requires_grad_(False)
    return pipe, source


def reference(source: Source, preset_name: str) -> DiffusionPipeline:
    """Rebuild the PyTorch pipeline a model directory was exported from (tests and bench)."""
    preset = presets.get(preset_name)
    if source.kind == "random":
        return random_pipeline(presets.get(source.id))
    model = source.id if source.kind != "single_file" else None
    if model is None:
        raise ExportError("single-file sources cannot be rebuilt from the manifest alone; pass the file")
    return load(preset, model, source.revision)[0]


def random_pipeline(preset: Preset) -> DiffusionPipeline:
    """A random-weight preset's pipeline: tiny (tests, demo) or full size (benchmarks)."""
    return fullsize.build(preset) if preset.name in fullsize.names() else tiny.build(preset)


def _from_folder(preset: Preset, path: Path) -> DiffusionPipeline:
    if not (path / "model_index.json").is_file():
        raise ExportError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    return guarded(path, lambda: pipeline_class(preset).from_pretrained(
        path, local_files_only=True, **_no_safety_checker(preset)))


def _from_hub(preset: Preset, hub_id: str, revision: str | None) -> DiffusionPipeline:
    return from_hub(hub_id, revision, lambda: pipeline_class(preset).from_pretrained(
        hub_id, revision=revision, **_no_safety_checker(preset)))


def from_hub(hub_id: str, revision: str | None, load_fn: Callable[[], T]) -> T:
    """`load_fn()`, which loads `hub_id` from the Hugging Face hub (or its local cache), with one line
    that says what to do when neither has it."""
    log.info("loading %s from the Hugging Face hub (revision %s)", hub_id, revision or "main")
    try:
        return guarded(hub_id, load_fn)
    except ExportError as exc:
        if _unreachable(exc):
            raise ExportError(
                f"cannot reach the Hugging Face hub for {hub_id} and it is not in the local cache; download it "
                "where the hub is reachable (or set HF_HOME to a cache that has it), or pass a local folder "
                "instead"
            ) from exc
        raise


def _unreachable(exc: BaseException | None) -> bool:
    """Whether the hub could not be reached (anywhere in the chain: a pipeline says so in its own message,
    a single model only in the error it raises from)."""
    while exc is not None:
        if "cache" in str(exc) or "connect" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def hub_commit(hub_id: str, revision: str | None) -> str | None:
    """The commit the hub cache holds for `revision` (a branch or tag moves; the commit names the weights
    that were exported), or `revision` itself when the cache cannot tell."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, revision=revision, local_files_only=True)).name
    except Exception:  # any cache layout surprise: keep what the user asked for
        return revision


def _from_single_file(preset: Preset, path: Path, config: str | None) -> DiffusionPipeline:
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ExportError(f"{path}: single-file checkpoints end in {' or '.join(SINGLE_FILE_SUFFIXES)}")
    kwargs: dict[str, object] = _no_safety_checker(preset)
    if config is not None:
        kwargs["config"] = config
        kwargs["local_files_only"] = Path(config).is_dir()
    return guarded(path, lambda: pipeline_class(preset).from_single_file(str(path), **kwargs))


def _no_safety_checker(preset: Preset) -> dict[str, object]:
    if preset.family == "sdxl":
        return {}
    return {"safety_checker": None, "requires_safety_checker": False}


def guarded(what: object, load_fn: Callable[[], T]) -> T:
    """Loading fails in many library-specific ways; the user gets one line naming the source."""
    try:
        return load_fn()
    except ExportError:
        raise
    except Exception as exc:  # diffusers, huggingface_hub, safetensors and torch all raise their own types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot load {what}: {reason}") from exc


def _check_family(preset: Preset, pipe: DiffusionPipeline, model: str) -> None:
    is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if is_sdxl != (preset.family == "sdxl"):
        kind = "an SDXL" if is_sdxl else "an SD 1.x/2.x"
        raise ExportError(f"{model} is {kind} checkpoint, but preset {preset.name!r} is {preset.family}")
    inpaint = pipe.unet.config.in_channels == 9
    if inpaint != (preset.variant == "inpaint"):
        what = "a 9-channel inpainting" if inpaint else "a 4-channel"
        raise ExportError(f"{model} has {what} UNet; preset {preset.name!r} is variant {preset.variant!r}")

