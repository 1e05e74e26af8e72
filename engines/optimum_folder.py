"""Folders in the layout `optimum-cli export onnx --task text-to-image` writes (and many hub repositories
ship in their `onnx` branches): `model_index.json`, `scheduler/`, `tokenizer*/`, and one `model.onnx` per
component folder, but no `model.json`. `infer` reads the manifest off the folder's files instead:

    family, variant  model_index.json's pipeline class, the UNet's channels, cross-attention width, config
    prediction type  scheduler/scheduler_config.json
    sizes            the VAE's ×8 scale and the UNet's depth (unet/ and vae_decoder/ config.json)
    graph signature  each model.onnx (`engines.signature`), with its dtypes, so fp16 exports load as such
    tokenizers       tokenizer*/ folders: tokenizer.json, or vocab.json + merges.txt

What cannot be read off the files (serving defaults, Turbo-ness) takes the family's usual values. Files
are hashed only for `python -m export adopt`, which writes the manifest so later loads are checked.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from engines import manifest as mf
from engines import signature
from engines.errors import ModelInvalid

log = logging.getLogger("sdserve.engines")

INDEX_FILE = "model_index.json"
SCHEDULER_FILE = "scheduler/scheduler_config.json"
# Serving defaults per family: what cannot be read off the files.
_DEFAULTS = {"sd1": (7.5, 4, 0.18215), "sd2": (7.5, 4, 0.18215), "sdxl": (5.0, 2, 0.13025)}
_SAMPLERS = {"EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
             "DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpmpp_2m", "LCMScheduler": "lcm"}
_STEPS = 30


def is_model_dir(path: Path) -> bool:
    """A model directory of ours (model.json) or a folder `infer` can read."""
    return (path / mf.MANIFEST_FILE).is_file() or is_optimum_folder(path)


def is_optimum_folder(path: Path) -> bool:
    return not (path / mf.MANIFEST_FILE).is_file() and (path / INDEX_FILE).is_file()


def infer(root: Path, hashes: bool = False) -> mf.Manifest:
    """The manifest of an optimum-layout folder; ModelInvalid naming every missing file at once."""
    index = _json(root / INDEX_FILE)
    sdxl = "XL" in str(index.get("_class_name", "")) or (root / "text_encoder_2").is_dir()
    encoders = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    tokenizers = ["tokenizer", "tokenizer_2"] if sdxl else ["tokenizer"]
    needed = [SCHEDULER_FILE, *(f"{name}/model.onnx" for name in [*encoders, "unet", "vae_encoder", "vae_decoder"])]
    missing = [name for name in needed if not (root / name).is_file()]
    missing += [f"{name}/ (tokenizer.json, or vocab.json + merges.txt)" for name in tokenizers
                if _tokenizer_files(root / name) is None]
    if missing:
        raise ModelInvalid(f"{root}: no {mf.MANIFEST_FILE}, and as an ONNX pipeline folder (optimum layout) it lacks "
                           f"{', '.join(missing)}")
    ref = _hashed if hashes else _unhashed
    components = {name: _component(root, name, ref) for name in [*encoders, "unet", "vae_encoder", "vae_decoder"]}
    unet, vae = _json(root / "unet" / "config.json", {}), _json(root / "vae_decoder" / "config.json", {})
    scheduler = _json(root / SCHEDULER_FILE)
    if scheduler.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise ModelInvalid(f"{root}: prediction type {scheduler['prediction_type']!r} in {SCHEDULER_FILE}; "
                           "sdserve renders epsilon and v_prediction models")
    family = "sdxl" if sdxl else _sd_family(unet, components["unet"])
    guidance, max_batch, scaling = _DEFAULTS[family]
    in_channels = _channels(components["unet"], "sample", unet.get("in_channels", 4))
    sizes, native = _sizes(unet, vae)
    manifest = mf.Manifest(
        name=root.name, family=family, variant="inpaint" if in_channels == 9 else "base",
        prediction_type=scheduler.get("prediction_type", "epsilon"),
        defaults=mf.Defaults(width=native, height=native, steps=_STEPS, guidance_scale=guidance,
                             sampler=_sampler(scheduler)),
        sizes=sizes, max_batch=max_batch, unet_in_channels=in_channels,
        latent_channels=_channels(components["vae_decoder"], "latent_sample", vae.get("latent_channels", 4)),
        vae_scale_factor=_vae_scale(vae), vae_scaling_factor=float(vae.get("scaling_factor", scaling)),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
        text_encoders=_text_encoders(root, components, sdxl),
        components=components,
        tokenizers={name: _tokenizer(root, name, ref) for name in tokenizers},
        scheduler=ref(root, SCHEDULER_FILE),
        source=mf.Source(kind="folder", id=str(root)),
        exporter={"layout": "optimum (inferred)", "diffusers": str(index.get("_diffusers_version", "unknown")),
                  "sdserve": mf.sdserve_version()},
    )
    if not hashes:  # served in place, not adopted
        log.warning("%s: no %s; manifest inferred from its optimum layout (%s/%s, %s, native %dx%d); `python -m "
                    "export adopt %s` writes it, so that later loads check every file", root.name,
                    mf.MANIFEST_FILE, family, manifest.variant, manifest.prediction_type, native, native, root)
    return manifest


def _json(path: Path, default: dict[str, Any] | None = None) -> dict[str, Any]:
    if default is not None and not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelInvalid(f"{path}: {exc}") from exc


def _unhashed(root: Path, relative: str) -> mf.FileRef:
    """A reference for a manifest used in place, never written: its sizes are checked, not its hashes."""
    return mf.FileRef(path=relative, sha256="", bytes=(root / relative).stat().st_size)


def _hashed(root: Path, relative: str) -> mf.FileRef:
    return mf.file_ref(root, relative)


def _component(root: Path, name: str, ref: Any) -> mf.Component:
    graph = signature.read(root / name / "model.onnx")
    if len(graph.external) > 1:
        raise ModelInvalid(f"{root / name}: weights in {len(graph.external)} external files; sdserve reads one "
                           "(re-save the graph with all_tensors_to_one_file=True)")
    external = None
    if graph.external:
        data = f"{name}/{graph.external[0]}"
        if not (root / data).is_file():
            raise ModelInvalid(f"{root}: {data} is missing (the external weights of {name}/model.onnx)")
        external = ref(root, data)
    floats = [t.dtype for t in [*graph.inputs, *graph.outputs] if t.dtype.startswith("float")]
    return mf.Component(graph=ref(root, f"{name}/model.onnx"), external_data=external,
                        precision="fp16" if "float16" in floats else "fp32",
                        inputs=graph.inputs, outputs=graph.outputs)


def _sd_family(unet: dict[str, Any], component: mf.Component) -> str:
    """SD 2.x: OpenCLIP's 1,024-wide states and linear attention projections; SD 1.x: CLIP's 768."""
    width = _channels(component, "encoder_hidden_states", unet.get("cross_attention_dim", 768), axis=2)
    return "sd2" if width == 1024 or unet.get("use_linear_projection") else "sd1"


def _channels(component: mf.Component, tensor: str, fallback: int, axis: int = 1) -> int:
    spec = next((t for t in component.inputs if t.name == tensor), None)
    dim = spec.shape[axis] if spec is not None and len(spec.shape) > axis else None
    return dim if isinstance(dim, int) and dim > 0 else int(fallback)


def _vae_scale(vae: dict[str, Any]) -> int:
    return 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)


def _sizes(unet: dict[str, Any], vae: dict[str, Any]) -> tuple[mf.Sizes, int]:
    """Sides step so that the latent halves evenly at every UNet down block; from half the native size
    to twice it."""
    scale = _vae_scale(vae)
    step = scale * 2 ** (len(unet.get("down_block_types", [0] * 4)) - 1)
    sample = unet.get("sample_size", 64)
    native = int(sample[0] if isinstance(sample, list) else sample) * scale
    low = max(step, native // 2 // step * step)
    return mf.Sizes(min=low, max=max(low, native * 2 // step * step), step=step), native


def _sampler(scheduler: dict[str, Any]) -> str:
    name = _SAMPLERS.get(str(scheduler.get("_class_name")), "dpmpp_2m")
    return "dpmpp_2m_karras" if name == "dpmpp_2m" and scheduler.get("use_karras_sigmas") else name


def _text_encoders(root: Path, components: dict[str, mf.Component], sdxl: bool) -> list[mf.TextEncoder]:
    if not sdxl:
        _require_output(root, components["text_encoder"], "text_encoder", "last_hidden_state")
        return [mf.TextEncoder("text_encoder", "tokenizer", "last_hidden_state")]
    # SDXL conditions on both encoders' penultimate layers and the second one's pooled projection.
    encoders = []
    for name, tokenizer, pooled in (("text_encoder", "tokenizer", None),
                                    ("text_encoder_2", "tokenizer_2", "text_embeds")):
        outputs = [t.name for t in components[name].outputs]
        layers = [int(o.rsplit(".", 1)[1]) for o in outputs if o.startswith("hidden_states.")]
        if len(layers) < 2:
            raise ModelInvalid(f"{root}: {name}/model.onnx has no hidden_states.N outputs; SDXL needs the "
                               "penultimate layer (export the text encoders with their hidden states)")
        if pooled:
            _require_output(root, components[name], name, pooled)
        encoders.append(mf.TextEncoder(name, tokenizer, f"hidden_states.{max(layers) - 1}", pooled_output=pooled))
    return encoders


def _require_output(root: Path, component: mf.Component, name: str, output: str) -> None:
    if output not in {t.name for t in component.outputs}:
        raise ModelInvalid(f"{root}: {name}/model.onnx has no output {output!r} "
                           f"(it has {', '.join(t.name for t in component.outputs)})")


def _tokenizer_files(folder: Path) -> tuple[str, str | None] | None:
    if (folder / "tokenizer.json").is_file():
        return "tokenizer.json", None
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return "vocab.json", "merges.txt"
    return None


def _tokenizer(root: Path, name: str, ref: Any) -> mf.Tokenizer:
    folder = root / name
    vocab_file, merges_file = _tokenizer_files(folder)
    config = {**_json(folder / "special_tokens_map.json", {}), **_json(folder / "tokenizer_config.json", {})}
    vocab = _vocabulary(folder / vocab_file)

    def token_id(role: str, default: str) -> int:
        token = config.get(f"{role}_token") or default
        text = token.get("content") if isinstance(token, dict) else str(token)
        if text not in vocab:
            raise ModelInvalid(f"{folder}: the {role} token {text!r} is not in its vocabulary")
        return vocab[text]

    max_length = int(config.get("model_max_length", 77))
    eos = token_id("eos", "<|endoftext|>")
    return mf.Tokenizer(
        file=ref(root, f"{name}/{vocab_file}"),
        merges=ref(root, f"{name}/{merges_file}") if merges_file else None,
        max_length=max_length if 2 < max_length <= 4096 else 77,  # "unlimited" (1e30) in some configs
        bos_id=token_id("bos", "<|startoftext|>"), eos_id=eos,
        pad_id=token_id("pad", "<|endoftext|>") if config.get("pad_token") else eos,
    )


def _vocabulary(path: Path) -> dict[str, int]:
    data = _json(path)
    if path.name == "tokenizer.json":  # the tokenizers format: the vocabulary plus its added special tokens
        vocab = dict(data.get("model", {}).get("vocab", {}))
        vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
        return vocab
    return data
