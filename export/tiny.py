"""Tiny random-weight pipelines of the real SD 1.x / 2.x / SDXL architectures.

They are the test fixtures and the offline demo model: built from diffusers and transformers classes
with small configs, in well under a second, with no network. Seeded, so two builds are identical.
The tokenizer is a real CLIP tokenizer over a small vocabulary (the first 1,000 BPE merges), so prompts
are tokenized by the real rules.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from export.presets import Preset

MERGES_FILE = Path(__file__).parent / "assets" / "clip_merges_1000.txt"
HIDDEN = 32  # text encoder width
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# The real models' scheduler configs (SD 1.5: PNDM; SD 2.1: DDIM v-prediction; SDXL: Euler, leading),
# so that the runtime is tested on following a model's config, not on one default.
SCHEDULER_ARGS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte → printable character table, in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary rule over the first merges: bytes, bytes + '</w>', merges, then the specials."""
    merges = [tuple(line.split()) for line in MERGES_FILE.read_text(encoding="utf-8").splitlines() if line]
    symbols = _bytes_to_unicode()
    words = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS, EOS]
    return {word: i for i, word in enumerate(words)}, merges


def tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    vocab, merges = vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def _text_config(tok: CLIPTokenizer, hidden_act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tok),
        max_position_embeddings=77,
        projection_dim=HIDDEN,
        hidden_act=hidden_act,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _vae(scaling_factor: float) -> AutoencoderKL:
    # Four levels keep the real ×8 latent scale. Several channels per norm group, as in the real VAE
    # (128 channels / 32 groups): with one channel per group a flat input image (the fully masked image
    # an inpainting model encodes for text to image) normalises rounding noise, and torch and ONNX
    # Runtime disagree by O(1) on what is really 0/0.
    return AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=128,
        scaling_factor=scaling_factor,
    )


def _unet(in_channels: int, cross_attention_dim: int, **extra: object) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        **extra,
    )


def _sd1(inpaint: bool) -> StableDiffusionPipeline:
    tok = tokenizer()
    parts = {
        "unet": _unet(9 if inpaint else 4, HIDDEN, attention_head_dim=8),
        "vae": _vae(0.18215),
        "text_encoder": CLIPTextModel(_text_config(tok, "quick_gelu")),
        "tokenizer": tok,
        "scheduler": PNDMScheduler(**SCHEDULER_ARGS, skip_prk_steps=True, set_alpha_to_one=False),
    }
    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    return cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sd2() -> StableDiffusionPipeline:
    tok = tokenizer(pad_token="!")
    return StableDiffusionPipeline(
        unet=_unet(4, HIDDEN, attention_head_dim=(2, 4), use_linear_projection=True),
        vae=_vae(0.18215),
        text_encoder=CLIPTextModel(_text_config(tok, "gelu")),
        tokenizer=tok,
        scheduler=DDIMScheduler(
            **SCHEDULER_ARGS, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl() -> StableDiffusionXLPipeline:
    tok, tok_2 = tokenizer(), tokenizer(pad_token="!")
    time_embed_dim = 8
    unet = _unet(
        4,
        2 * HIDDEN,  # both encoders' hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + HIDDEN,  # 6 time ids + pooled text
    )
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=_vae(0.13025),
        text_encoder=CLIPTextModel(_text_config(tok, "quick_gelu")),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tok_2, "gelu")),
        tokenizer=tok,
        tokenizer_2=tok_2,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_ARGS, timestep_spacing="leading", interpolation_type="linear"),
        force_zeros_for_empty_prompt=True,
    )


_BUILDERS = {
    "tiny-sd15": lambda: _sd1(inpaint=False),
    "tiny-sd15-inpaint": lambda: _sd1(inpaint=True),
    "tiny-sd21": _sd2,
    "tiny-sdxl": _sdxl,
}


def build(preset: Preset) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The preset's tiny pipeline, in eval mode, identical on every call."""
    return seeded(_BUILDERS[preset.name], preset.random_seed or 0)


def seeded(builder: Callable[[], DiffusionPipeline], seed: int) -> DiffusionPipeline:
    """`builder()` under torch's global seed `seed` (restored afterwards), in eval mode without grads."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = builder()
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return pipe


def names() -> list[str]:
    return list(_BUILDERS)
