"""LoRA adapter files: `.safetensors` read with safetensors' numpy API (no torch), in the diffusers/PEFT
and kohya/A1111 key formats, into one shape: per component, per layer key, (down, up, alpha / rank).

    diffusers/PEFT  unet.<module>.lora_A.weight / .lora_B.weight   (also .lora.down/.up, lora_linear_layer)
                    text_encoder.…, text_encoder_2.…; alpha from the file's `lora_adapter_metadata`
                    (`<part>.lora_alpha`, `<part>.alpha_pattern`, `<part>.use_rslora`) or `<module>.alpha`
    kohya           lora_unet_<module_with_underscores>.lora_down.weight / .lora_up.weight / .alpha,
                    lora_te_ / lora_te1_ (text_encoder), lora_te2_ (text_encoder_2)

Layer keys stay as the file spells them (dotted module paths, or kohya's underscored names); `engines.lora`
matches them to a model's layers. Kinds the engine cannot apply exactly are refused with their name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PARTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_PARTS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
_DIFFUSERS = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|"
                        r"lora_linear_layer\.down|lora_linear_layer\.up)(\.default)?\.weight$")
_DIFFUSERS_ALPHA = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.alpha$")
_KOHYA = re.compile(r"^lora_(unet|te|te1|te2)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_OTHER_KINDS = (("hada_", "LoHa"), ("lokr_", "LoKr"), ("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"),
                ("lora_mid", "LoCon with a mid (CP-decomposed) convolution"), ("diff_b", "full-weight difference"),
                (".diff", "full-weight difference"), ("glora_", "GLoRA"))


class AdapterRefused(Exception):
    """The file is not an adapter this engine can apply; the message says why."""


@dataclass(frozen=True)
class Layer:
    down: np.ndarray  # (r, in) or (r, in, 1, 1)
    up: np.ndarray  # (out, r) or (out, r, 1, 1)
    scale: float  # alpha / r (or alpha / √r for rsLoRA)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class Adapter:
    name: str  # the file's stem: what requests call it
    format: str  # "diffusers" or "kohya"
    layers: dict[str, dict[str, Layer]]  # part → layer key (as in the file) → matrices

    @property
    def rank(self) -> int:
        return max(layer.rank for part in self.layers.values() for layer in part.values())

    @property
    def parts(self) -> list[str]:
        return [part for part in PARTS if self.layers.get(part)]


def read(path: Path) -> Adapter:
    """One `.safetensors` adapter file, or AdapterRefused saying why it cannot be used."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            keys = list(handle.keys())
            metadata = handle.metadata() or {}
            _refuse_other_kinds(keys, metadata)
            tensors = {key: handle.get_tensor(key) for key in keys}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:  # bf16 and corrupt files land here
        raise AdapterRefused(f"cannot read {path.name} with safetensors' numpy API: {exc}") from exc
    if not keys:
        raise AdapterRefused(f"{path.name} holds no tensors")
    if any(key.startswith("lora_") for key in keys):
        return Adapter(path.stem, "kohya", _kohya(tensors))
    return Adapter(path.stem, "diffusers", _diffusers(tensors, metadata))


def _refuse_other_kinds(keys: list[str], metadata: dict[str, str]) -> None:
    for marker, kind in _OTHER_KINDS:
        if any(marker in key for key in keys):
            raise AdapterRefused(f"a {kind} adapter: only plain LoRA (low-rank linear and 1×1 layers) can be "
                                 "applied exactly per request")
    if '"use_dora": true' in metadata.get("lora_adapter_metadata", ""):
        raise AdapterRefused("a DoRA adapter: only plain LoRA can be applied exactly per request")


def _kohya(tensors: dict[str, np.ndarray]) -> dict[str, dict[str, Layer]]:
    found: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _KOHYA.match(key)
        if not match:
            raise AdapterRefused(f"unrecognised key {key!r} in a kohya-format adapter")
        part, name, kind = _KOHYA_PARTS[match.group(1)], match.group(2), match.group(3).split(".")[0]
        found.setdefault((part, name), {})[kind] = value
    layers: dict[str, dict[str, Layer]] = {}
    for (part, name), entries in found.items():
        down, up = _pair(entries.get("lora_down"), entries.get("lora_up"), name)
        alpha = entries.get("alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        layers.setdefault(part, {})[name] = Layer(down, up, scale)
    return layers


def _diffusers(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> dict[str, dict[str, Layer]]:
    config = _metadata(metadata)
    found: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    alphas: dict[tuple[str, str], float] = {}
    for key, value in tensors.items():
        if match := _DIFFUSERS.match(key):
            role = "down" if match.group(3) in ("lora_A", "lora.down", "lora_linear_layer.down") else "up"
            found.setdefault((match.group(1), _module(match.group(2))), {})[role] = value
        elif match := _DIFFUSERS_ALPHA.match(key):
            alphas[(match.group(1), _module(match.group(2)))] = float(value)
        else:
            raise AdapterRefused(f"unrecognised key {key!r}: neither the diffusers/PEFT nor the kohya LoRA format")
    layers: dict[str, dict[str, Layer]] = {}
    for (part, name), entries in found.items():
        down, up = _pair(entries.get("down"), entries.get("up"), name)
        settings = config.get(part, {})
        alpha = alphas.get((part, name), _pattern(settings.get("alpha_pattern", {}), name,
                                                  settings.get("lora_alpha", down.shape[0])))
        root = math.sqrt(down.shape[0]) if settings.get("use_rslora") else down.shape[0]
        layers.setdefault(part, {})[name] = Layer(down, up, float(alpha) / root)
    return layers


def _module(name: str) -> str:
    """diffusers' older attention-processor spelling (`attn1.processor.to_q_lora`) → the module path."""
    name = name.replace(".processor.", ".")
    return re.sub(r"(to_q|to_k|to_v)_lora$", r"\1", re.sub(r"to_out_lora$", "to_out.0", name))


def _metadata(metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata`: the LoraConfig of each part, keys prefixed with the part."""
    try:
        flat = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError as exc:
        raise AdapterRefused(f"unreadable lora_adapter_metadata: {exc}") from exc
    config: dict[str, dict] = {}
    for key, value in flat.items():
        part, _, field = key.rpartition(".")
        config.setdefault(part, {})[field] = value
    return config


def _pattern(patterns: dict[str, float], name: str, default: float) -> float:
    """PEFT's alpha_pattern: a key matches a module path that ends with it (after a dot)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _pair(down: np.ndarray | None, up: np.ndarray | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    if down is None or up is None:
        raise AdapterRefused(f"layer {name} has only one of its two LoRA matrices")
    if down.ndim == 4 and down.shape[2:] != (1, 1):
        raise AdapterRefused(f"a convolution LoRA (LoCon): layer {name} has a {down.shape[2]}×{down.shape[3]} "
                             "kernel; only linear and 1×1 layers can be applied")
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
        raise AdapterRefused(f"layer {name}: matrices of shapes {down.shape} and {up.shape} do not form a LoRA pair")
    return down.astype(np.float32), up.astype(np.float32)
