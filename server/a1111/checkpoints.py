"""AUTOMATIC1111's checkpoint routes, mapped onto the engine pool's models as a cache (`server.node.cache`):

    POST /sdapi/v1/refresh-checkpoints   look at the models folder again (POST /v0/models/rescan)
    POST /sdapi/v1/unload-checkpoint     unload every idle loaded model
    POST /sdapi/v1/reload-checkpoint     load the selected checkpoint (`sd_model_checkpoint`, else the default model)
    POST /sdapi/v1/options               switching `sd_model_checkpoint` loads that model before answering

On a router the models live on its nodes, which load on demand and rescan on their own: refreshing and
switching answer at once, and unloading or reloading there is done on each node (`/v0/models`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Request, post

from server.errors import ApiError
from server.state import AppState, Models


@post("/refresh-checkpoints", status_code=200, summary="Look at the models folder again for models added or removed")
async def refresh_checkpoints(request: Request) -> dict[str, Any]:
    models = AppState.of(request).models
    if models is not None:
        await models.rescan()
    return {}


@post("/unload-checkpoint", status_code=200, summary="Unload every loaded model that is idle")
async def unload_checkpoint(request: Request) -> dict[str, Any]:
    await _on_this_server(AppState.of(request)).unload_idle()
    return {}


async def reload(state: AppState, selected: str | None) -> None:
    """reload-checkpoint: load the selected checkpoint (`sd_model_checkpoint`, else the default model) now."""
    await load(state, _on_this_server(state), state.model(selected).id)


async def switch(state: AppState, name: str) -> None:
    """`sd_model_checkpoint` changed: load it now, as A1111 does (nodes behind a router load it on demand)."""
    if state.models is not None:
        try:
            await load(state, state.models, name)
        except ApiError as error:  # known (checked before) yet not here: only remote nodes serve it, on demand
            if error.code != "model_not_found":
                raise


async def load(state: AppState, models: Models, name: str) -> None:
    timeout = state.settings.request_timeout
    try:
        await asyncio.wait_for(models.load(name), timeout)
    except TimeoutError:  # it goes on loading
        raise ApiError(504, f"model '{name}' did not load within the {timeout:g} s request timeout (it may be waiting "
                       "for a loaded model to be idle)", code="timeout") from None


def _on_this_server(state: AppState) -> Models:
    if state.models is None:
        raise ApiError(501, "this router holds no models: its nodes load them on demand; unload or load them on each "
                       "node (POST /v0/models/{id}/unload or /load there, with the admin key)", code="not_supported")
    return state.models


CHECKPOINT_ROUTES = [refresh_checkpoints, unload_checkpoint]  # and reload-checkpoint, with the options
