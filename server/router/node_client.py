"""How a front door talks to a remote node: `NodeClient`, the HTTP `server.wire.NodeTransport` (orders
as msgpack, streams as OpenAI's frames), with the transport signals of `server.wire` for its failures.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import httpx
import msgspec

from server import sse
from server.errors import ApiError, decode_error_body
from server.wire import (
    MSGPACK,
    NodeFull,
    NodeGone,
    NodeRefused,
    NodeReport,
    NodeUnavailable,
    RenderedImages,
    RenderOrder,
    StreamEvent,
)


class NodeClient:
    def __init__(self, url: str, token: str | None, connect_timeout: float, render_timeout: float) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers,
                                      timeout=httpx.Timeout(render_timeout, connect=connect_timeout),
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    async def render(self, order: RenderOrder) -> RenderedImages:
        response = await self._post("/v0/render", order, stream=False)
        if response.status_code == 200:
            try:
                return msgspec.msgpack.decode(response.content, type=RenderedImages)
            except msgspec.DecodeError as exc:  # not a node, or a broken one: try another
                raise NodeUnavailable(f"the answer is not a render: {exc}") from exc
        raise _refusal(response)

    async def open_stream(self, order: RenderOrder) -> AsyncGenerator[bytes, None]:
        """POST /v0/stream; returns the stream's whole frames once the node answered 200 (its refusals raise
        here); a stream cut off before its last event raises `NodeGone`."""
        response = await self._post("/v0/stream", order, stream=True)
        if response.status_code != 200:
            try:
                await response.aread()
            except httpx.HTTPError as exc:
                raise NodeUnavailable(f"{type(exc).__name__}: {exc}") from exc
            finally:
                await response.aclose()
            raise _refusal(response)
        return sse.whole_frames(_chunks(response), order.n)

    async def open_events(self, order: RenderOrder) -> AsyncGenerator[StreamEvent, None]:
        """The stream's frames read back into events."""
        return sse.events(await self.open_stream(order))

    async def _post(self, path: str, order: RenderOrder, stream: bool) -> httpx.Response:
        """The node's answer to `order`; a node that cannot take it raises NodeRefused / NodeUnavailable. A render
        that outlives the request timeout is a 504 (a stream's answer is only its start: a timeout is the node's)."""
        request = self.http.build_request("POST", path, content=msgspec.msgpack.encode(order),
                                          headers={"content-type": MSGPACK, "x-request-id": order.request_id})
        try:
            return await self.http.send(request, stream=stream)
        except httpx.TimeoutException as exc:
            if stream or isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
                raise NodeUnavailable(f"timeout: {exc}") from exc
            raise ApiError(504, "the node did not answer within the request timeout", code="timeout") from exc
        except httpx.ConnectError as exc:  # refused (or unresolvable): nothing was sent
            raise NodeRefused(f"{type(exc).__name__}: {exc}") from exc
        except httpx.TransportError as exc:  # reset, closed mid-answer
            raise NodeUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except RuntimeError as exc:
            if not self.http.is_closed:
                raise
            raise NodeUnavailable("this node's registration was replaced") from exc

    async def status(self, timeout: float) -> NodeReport:
        """The node's report, within `timeout` seconds in all (a probe: short, unlike a render)."""
        try:
            response = await asyncio.wait_for(self.http.get("/v0/status", timeout=timeout), timeout)
        except TimeoutError as exc:
            raise NodeUnavailable(f"no status within {timeout:g} s") from exc
        except (httpx.HTTPError, RuntimeError) as exc:  # RuntimeError: the client was closed meanwhile
            raise NodeUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise NodeUnavailable(f"status answered {response.status_code}")
        try:
            return msgspec.json.decode(response.content, type=NodeReport)
        except msgspec.DecodeError as exc:
            raise NodeUnavailable(f"status is not a node report: {exc}") from exc

    async def close(self) -> None:
        await self.http.aclose()


def _refusal(response: httpx.Response) -> Exception:
    error = decode_error_body(response.content, response.status_code)
    if response.status_code == 429:
        error.headers["Retry-After"] = response.headers.get("retry-after", "1")
        return NodeFull(error)
    if response.status_code == 503:
        return NodeRefused(f"503: {error.message}")
    if response.status_code == 502:
        return NodeUnavailable(f"502: {error.message}")
    return error


async def _chunks(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    """The body as it arrives; a connection lost midway is the node's failure."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        raise NodeGone(f"{type(exc).__name__}: {exc}") from exc
    finally:
        await response.aclose()
