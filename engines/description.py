"""A model directory described without loading it: its manifest (ours, or inferred from an optimum folder)
and the `ModelInfo` a server lists and checks requests against before the model's first load."""

from __future__ import annotations

from pathlib import Path

from engines import controlnet, optimum_folder, schedulers
from engines import manifest as mf
from engines.controlnet import ControlNets
from engines.errors import ModelNotFound
from engines.info import ModelInfo
from engines.lora import Adapters


def read_manifest(root: Path, verify: bool = True) -> mf.Manifest:
    """`model.json`, or the manifest of an ONNX pipeline folder in optimum's layout."""
    if not root.is_dir():
        raise ModelNotFound(str(root), f"no model directory at {root}")
    return optimum_folder.infer(root) if optimum_folder.is_optimum_folder(root) else mf.read(root, verify=verify)


def describe(model_dir: str | Path, backend: str = "auto", lora_dir: str | Path | None = None) -> ModelInfo:
    """What a model directory offers, read from its manifest (no sessions, no sha256 checks). `backend` is
    the one asked for and `device` is empty: which runs it is known once it loads."""
    root = Path(model_dir)
    manifest = read_manifest(root, verify=False)
    lora = Adapters(root.name, manifest)
    if lora_dir is not None:
        lora.load(lora_dir)
    return model_info(root, manifest, backend, "", manifest.max_batch, lora)


def model_info(root: Path, manifest: mf.Manifest, backend: str, device: str, max_batch: int,
               lora: Adapters, controlnets: ControlNets | None = None) -> ModelInfo:
    """`controlnets` None (before a load): those the manifest records, none opened yet."""
    offered = controlnets.infos if controlnets is not None else \
        [controlnet.info(name, entry) for name, entry in manifest.controlnets.items()]
    return ModelInfo(
        id=root.name, name=manifest.name, family=manifest.family, variant=manifest.variant,
        prediction_type=manifest.prediction_type, sizes=manifest.sizes, defaults=manifest.defaults,
        max_batch=max_batch, inpainting_unet=manifest.unet_in_channels == 9, samplers=schedulers.SAMPLERS,
        backend=backend, device=device, lora_rank=lora.rank, tiny_decoder=manifest.tiny_decoder is not None,
        adapters=lora.infos(), refused_adapters=lora.refused, controlnet_inputs=manifest.residuals is not None,
        controlnets=offered, refused_controlnets=controlnets.refused if controlnets is not None else {},
    )
