"""POST /v0/adapters/reload (admin key): a node or standalone server reads its LoRA directory again."""

from __future__ import annotations

import anyio
from litestar import Request, post

from server.adapters import cards
from server.errors import ApiError, documented
from server.protocol import AdapterCard
from server.routes.guards import admin_key
from server.state import AppState


@post("/adapters/reload", status_code=200, guards=[admin_key], responses=documented(401),
      summary="Read the LoRA directory again (admin key): adapters added, changed or removed since start-up")
async def reload(request: Request) -> dict[str, list[AdapterCard]]:
    state = AppState.of(request)
    if state.pool is None:
        raise ApiError(404, "only nodes and standalone servers hold adapters", code="not_found")
    await anyio.to_thread.run_sync(state.pool.reload_adapters)
    return {name: cards(info) for name, info in sorted(state.pool.ready_models().items())}
