"""LoRA adapter files for the tests, made with PEFT on the tiny models (random nonzero A and B), saved in
the diffusers format (diffusers' `save_lora_weights`) or, by renaming the keys here, in kohya's format
with an alpha different from the rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.numpy import save_file

from export import presets, tiny

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _lora_layers(module: torch.nn.Module, targets: list[str], rank: int, alpha: float,
                 seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
    inject_adapter_in_model(config, module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_" in name:  # PEFT leaves lora_B at zero: the adapter would do nothing
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    return get_peft_model_state_dict(module), metadata


def make(folder: Path, name: str, preset: str, parts: tuple[str, ...], rank: int, alpha: float, seed: int,
         kohya: bool = False) -> Path:
    """`folder/name.safetensors`: an adapter of `rank` on the given parts of `preset`'s tiny model."""
    pipe = tiny.build(presets.get(preset))
    layers, metadata = {}, {}
    for index, part in enumerate(parts):
        targets = UNET_TARGETS if part == "unet" else TEXT_TARGETS
        layers[part], metadata[part] = _lora_layers(getattr(pipe, part), targets, rank, alpha, seed + index)
    path = folder / f"{name}.safetensors"
    if kohya:
        save_file(_kohya_keys(layers, alpha, sdxl=preset == "tiny-sdxl"), str(path))
        return path
    saver = StableDiffusionXLPipeline if preset == "tiny-sdxl" else StableDiffusionPipeline
    saver.save_lora_weights(folder, weight_name=path.name, **{f"{p}_lora_layers": layers[p] for p in parts},
                            **{f"{p}_lora_adapter_metadata": metadata[p] for p in parts})
    return path


def _kohya_keys(layers: dict[str, dict[str, torch.Tensor]], alpha: float, sdxl: bool) -> dict[str, np.ndarray]:
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
                "text_encoder_2": "lora_te2_"}
    out = {}
    for part, state in layers.items():
        for key, value in state.items():
            module, _, kind = key.rpartition(".lora_")
            if part != "unet" and not module.startswith("text_model."):
                module = "text_model." + module  # kohya names CLIP layers with transformers 4's prefix
            base = prefixes[part] + module.replace(".", "_")
            role = "lora_down" if kind.startswith("A") else "lora_up"
            out[f"{base}.{role}.weight"] = value.numpy()
            out[f"{base}.alpha"] = np.array(alpha, np.float32)
    return out


def locon(folder: Path) -> Path:
    """A kohya LoCon file: a 3×3 convolution LoRA on a resnet."""
    path = folder / "locon.safetensors"
    base = "lora_unet_down_blocks_0_resnets_0_conv1"
    save_file({f"{base}.lora_down.weight": np.ones((2, 32, 3, 3), np.float32),
               f"{base}.lora_up.weight": np.ones((32, 2, 1, 1), np.float32),
               f"{base}.alpha": np.array(2.0, np.float32)}, str(path))
    return path
