"""Full-size random-weight pipelines: the real SD 1.5, SD 2.1 and SDXL architectures, no download.

Speed depends on shapes, not on weight values, so these measure the real cost of a model on machines
that cannot reach the hub (this one, air-gapped GPU runners). The numbers below are the public
configs' (`unet/config.json`, `text_encoder/config.json`, `vae/config.json` of the hub repositories
named in each preset), written out so that nothing is fetched. Weights are diffusers' and
transformers' default initialisation under a fixed seed; images are noise.

The tokenizer is the tiny models' real-rule CLIP tokenizer (first 1,000 merges): token ids stay below
the real 49,408-entry embedding table, and a prompt is still 77 tokens, so every shape is the real one.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from export import tiny
from export.presets import Preset

CLIP_VOCAB = 49408

# openai/clip-vit-large-patch14 (SD 1.x, SDXL's first encoder)
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "projection_dim": 768, "hidden_act": "quick_gelu"}
# OpenCLIP ViT-H/14 as SD 2.x ships it (the last of 24 layers dropped)
OPENCLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
              "projection_dim": 512, "hidden_act": "gelu"}
# OpenCLIP ViT-bigG/14 (SDXL's second encoder, with its text projection)
OPENCLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
                 "projection_dim": 1280, "hidden_act": "gelu"}

UNET_SD15 = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
UNET_SD21 = UNET_SD15 | {"sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
                         "use_linear_projection": True}
UNET_SDXL = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids × 256 + bigG's 1280-wide pooled embedding
}
VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}


def _text_encoder(cls: type[CLIPTextModel], config: dict[str, Any]) -> CLIPTextModel:
    tok = tiny.tokenizer()
    return cls(CLIPTextConfig(**config, vocab_size=CLIP_VOCAB, max_position_embeddings=77,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id))


def _sd15() -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**UNET_SD15),
        vae=AutoencoderKL(**VAE, sample_size=512, scaling_factor=0.18215),
        text_encoder=_text_encoder(CLIPTextModel, CLIP_L),
        tokenizer=tiny.tokenizer(),
        scheduler=PNDMScheduler(**tiny.SCHEDULER_ARGS, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _sd21() -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**UNET_SD21),
        vae=AutoencoderKL(**VAE, sample_size=768, scaling_factor=0.18215),
        text_encoder=_text_encoder(CLIPTextModel, OPENCLIP_H),
        tokenizer=tiny.tokenizer(pad_token="!"),
        scheduler=DDIMScheduler(**tiny.SCHEDULER_ARGS, prediction_type="v_prediction", clip_sample=False,
                                set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _sdxl() -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(**UNET_SDXL),
        vae=AutoencoderKL(**VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text_encoder=_text_encoder(CLIPTextModel, CLIP_L),
        text_encoder_2=_text_encoder(CLIPTextModelWithProjection, OPENCLIP_BIGG),
        tokenizer=tiny.tokenizer(),
        tokenizer_2=tiny.tokenizer(pad_token="!"),
        scheduler=EulerDiscreteScheduler(**tiny.SCHEDULER_ARGS, timestep_spacing="leading",
                                         interpolation_type="linear"),
        force_zeros_for_empty_prompt=True,
    )


_BUILDERS = {"random-sd15": _sd15, "random-sd21": _sd21, "random-sdxl": _sdxl}


def build(preset: Preset) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The preset's full-size pipeline with seeded random weights, in fp32 eval mode."""
    return tiny.seeded(_BUILDERS[preset.name], preset.random_seed or 0)


def names() -> list[str]:
    return list(_BUILDERS)
