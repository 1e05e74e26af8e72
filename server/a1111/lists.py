"""What A1111 clients read at start-up (`/sdapi/v1`): the models, samplers, schedules and LoRA adapters, the
scripts and command-line flags, memory; and the lists of things this server does not have, answered empty
in A1111's shapes (upscalers, VAEs, embeddings…) rather than 404, which clients take for a broken server."""

from __future__ import annotations

import os
from typing import Any

from litestar import Request, get

from server.a1111 import protocol as a1111
from server.a1111.protocol import (
    EmbeddingsResponse,
    LoraItem,
    MemoryResponse,
    SamplerItem,
    SchedulerItem,
    ScriptsList,
    SDModelItem,
)
from server.state import AppState

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@get("/sd-models", summary="The models, as A1111 lists checkpoints")
async def sd_models(request: Request) -> list[SDModelItem]:
    ready = sorted(AppState.of(request).renderer.ready_models())
    return [SDModelItem(title=name, model_name=name, hash=None, sha256=None, filename=name) for name in ready]


@get("/samplers", summary="The samplers, by A1111's names")
async def samplers() -> list[SamplerItem]:
    return [SamplerItem(name=name, aliases=a1111.SAMPLER_ALIASES[name], options={}) for name in a1111.SAMPLERS]


@get("/schedulers", summary="The schedules (Karras with DPM++ 2M only)")
async def schedulers() -> list[SchedulerItem]:
    return [SchedulerItem(name=name, label=label, default_rho=7.0 if name == "karras" else -1.0)
            for name, label in a1111.SCHEDULERS.items()]


@get("/loras", summary="LoRA adapters of the models that can render now, for `<lora:name:weight>` prompt tags")
async def loras(request: Request) -> list[LoraItem]:
    ready = AppState.of(request).renderer.ready_models().values()
    names = sorted({adapter.name for info in ready for adapter in info.adapters})
    return [LoraItem(name=name, alias=name, path=f"{name}.safetensors") for name in names]


@get("/scripts", summary="Scripts txt2img and img2img take: ControlNet's always-on script (no selectable ones)")
async def scripts() -> ScriptsList:
    return ScriptsList(txt2img=["controlnet"], img2img=["controlnet"])


@get("/embeddings", summary="Textual-inversion embeddings: none (the engines load none)")
async def embeddings() -> EmbeddingsResponse:
    return EmbeddingsResponse()


@get("/cmd-flags", summary="A1111's command-line flags that mean something here, from this server's settings")
async def cmd_flags(request: Request) -> dict[str, Any]:
    settings = AppState.of(request).settings
    return {"api": True, "nowebui": not settings.playground, "listen": settings.host not in LOOPBACK,
            "port": settings.port, "ckpt_dir": settings.models_dir, "lora_dir": settings.lora_dir,
            "embeddings_dir": None, "hypernetwork_dir": None, "data_dir": settings.images_dir}


@get("/memory", summary="This process's memory (ram); GPU memory is not measured (cuda: error)")
async def memory() -> MemoryResponse:
    return MemoryResponse(ram=_ram(), cuda={"error": "not measured: this server runs no torch"})


@get(["/upscalers", "/sd-vae", "/latent-upscale-modes", "/prompt-styles", "/hypernetworks", "/face-restorers",
      "/realesrgan-models"], summary="Lists A1111 has and this server does not use: empty")
async def empty_lists() -> list[Any]:
    return []


LIST_ROUTES = [sd_models, samplers, schedulers, loras, scripts, embeddings, cmd_flags, memory, empty_lists]


def _ram() -> dict[str, Any]:
    """As A1111 reports it: `used` is this process's resident memory, `free` the rest of the machine's."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        with open("/proc/self/statm") as statm:
            used = int(statm.read().split()[1]) * page
    except (OSError, ValueError, IndexError) as exc:
        return {"error": f"{exc}"}
    return {"free": total - used, "used": used, "total": total}
