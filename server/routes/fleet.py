"""The router's fleet routes: node registration, heartbeats, deregistration (node token), and the
`/v0/nodes` listing (admin key)."""

from __future__ import annotations

from litestar import Request, delete, get, post

from server.errors import ApiError, documented
from server.protocol import NodeList, NodeReport, Registered
from server.router.node_client import NodeClient, NodeUnavailable
from server.routes.guards import admin_key, node_token
from server.state import AppState


@post("/nodes/register", status_code=200, guards=[node_token], responses=documented(400, 401, 409),
      summary="A node joins (node token)")
async def register(data: NodeReport, request: Request) -> Registered:
    """The router calls the node back at its advertised URL before accepting it: the URL must reach a
    node that answers with the same id (so a node cannot register an address that is not its own)."""
    state = AppState.of(request)
    settings = state.settings
    client = NodeClient(data.url, settings.node_token, settings.connect_timeout, settings.request_timeout)
    try:
        answer = await client.status()
    except NodeUnavailable as exc:
        await client.close()
        raise ApiError(400, f"the router cannot reach {data.url}/v0/status ({exc}); check --advertise-url",
                       param="url", code="node_unreachable") from exc
    if answer.node_id != data.node_id:
        await client.close()
        raise ApiError(409, f"the node at {data.url} is {answer.node_id}, not {data.node_id}", param="node_id",
                       code="identity_mismatch")
    previous = state.registry.nodes.get(data.node_id)
    try:
        record = state.registry.register(data, client)
    except ApiError:
        await client.close()
        raise
    if previous is not None and previous.client is not client:
        await previous.client.close()
    await state.dispatcher.notify()
    return Registered(node_id=record.id, lease=record.lease, heartbeat_interval=settings.heartbeat_interval)


@post("/nodes/{node_id:str}/heartbeat", status_code=200, guards=[node_token],
      responses=documented(400, 401, 403, 409), summary="Node heartbeat")
async def heartbeat(node_id: str, data: NodeReport, request: Request) -> dict[str, str]:
    state = AppState.of(request)
    record = state.registry.authenticate(node_id, request.headers.get("x-node-lease", ""))
    state.registry.heartbeat(record, data)
    await state.dispatcher.notify()
    return {"status": "ok"}


@delete("/nodes/{node_id:str}", status_code=200, guards=[node_token], responses=documented(401, 403, 409),
        summary="A node leaves")
async def deregister(node_id: str, request: Request) -> dict[str, str]:
    state = AppState.of(request)
    record = state.registry.authenticate(node_id, request.headers.get("x-node-lease", ""))
    state.registry.remove(record)
    await record.client.close()
    return {"status": "removed"}


@get("/nodes", guards=[admin_key], responses=documented(401), summary="Nodes with their state and counters (admin key)")
async def list_nodes(request: Request) -> NodeList:
    state = AppState.of(request)
    state.dispatcher.ready_models()  # refreshes the in-process node's report
    return NodeList(data=state.registry.views())
