"""GET /v1/models and /v1/models/{id}: the OpenAI model list and one model, with what each supports."""

from __future__ import annotations

from litestar import Request, get

from engines import limits
from engines.info import ModelInfo
from server import adapters
from server.errors import documented
from server.openai import controlnets
from server.protocol import ModelCard, ModelList, SizeRange, StrengthDefaults
from server.state import AppState

STRENGTHS = StrengthDefaults(image=limits.default_strength(False), mask=limits.default_strength(True),
                             variation=limits.default_strength(False, variation=True))


def card(info: ModelInfo, created: int, backends: list[str]) -> ModelCard:
    return ModelCard(
        id=info.id, created=created, family=info.family, variant=info.variant,
        sizes=SizeRange(info.sizes.min, info.sizes.max, info.sizes.step),
        default_size=f"{info.defaults.width}x{info.defaults.height}", default_steps=info.defaults.steps,
        default_guidance_scale=info.defaults.guidance_scale, default_sampler=info.defaults.sampler,
        samplers=list(info.samplers), backends=backends, lora_rank=info.lora_rank, adapters=adapters.cards(info),
        limits=limits.BOUNDS, default_strength=STRENGTHS, controlnet_inputs=info.controlnet_inputs,
        controlnets=controlnets.cards(info),
    )


@get("/models", responses=documented(401), summary="List the models that can render now")
async def list_models(request: Request) -> ModelList:
    state = AppState.of(request)
    started = int(request.app.state.started)
    ready = sorted(state.renderer.ready_models().items())
    return ModelList(data=[card(info, started, [info.backend]) for _, info in ready])


@get("/models/{model:str}", responses=documented(401, 404, 503), summary="One model (OpenAI `models.retrieve`)")
async def retrieve_model(model: str, request: Request) -> ModelCard:
    """A model id or an alias (`dall-e-3` → the default model): the card of the model that would render it."""
    state = AppState.of(request)
    info = state.resolve_model(model, request)
    return card(info, int(request.app.state.started), [info.backend])
