"""How a router talks to a node: over HTTP (`NodeClient`) or in-process (`LocalNode`, standalone role).

Both raise the same two signals for dispatch: `NodeFull` (the node refused for lack of room: try
another node or wait) and `NodeUnavailable` (it could not be reached, went away, or refused before
starting: take it out of rotation and retry elsewhere). Any other error is the request's own and final.
Renders are idempotent (the seed is fixed before dispatch), so retrying one a dead node had started is safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import msgspec

from server import streaming
from server.errors import ApiError, decode_error_body
from server.protocol import NodeReport, RenderedImages, RenderJob

MSGPACK = "application/msgpack"


class NodeFull(Exception):
    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


class NodeUnavailable(Exception):
    pass


class NodeRefused(NodeUnavailable):
    """The node will not take this job: it answered 503 (draining, its model unavailable) or refused the
    connection (its listener is closed: shutting down). The job goes elsewhere; what the node already has
    is left to finish there."""


class NodeClient:
    def __init__(self, url: str, token: str | None, connect_timeout: float, render_timeout: float) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers,
                                      timeout=httpx.Timeout(render_timeout, connect=connect_timeout),
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    async def render(self, job: RenderJob) -> RenderedImages:
        response = await self._post("/v0/render", job, stream=False)
        if response.status_code == 200:
            try:
                return msgspec.msgpack.decode(response.content, type=RenderedImages)
            except msgspec.DecodeError as exc:  # not a node, or a broken one: try another
                raise NodeUnavailable(f"the answer is not a render: {exc}") from exc
        raise _refusal(response)

    async def open_stream(self, job: RenderJob) -> AsyncIterator[bytes]:
        """POST /v0/stream; returns the event stream once the node answered 200 (its refusals raise here)."""
        response = await self._post("/v0/stream", job, stream=True)
        if response.status_code != 200:
            try:
                await response.aread()
            except httpx.HTTPError as exc:
                raise NodeUnavailable(f"{type(exc).__name__}: {exc}") from exc
            finally:
                await response.aclose()
            raise _refusal(response)
        return _chunks(response)

    async def _post(self, path: str, job: RenderJob, stream: bool) -> httpx.Response:
        """The node's answer to `job`; a node that cannot take it raises NodeRefused / NodeUnavailable. A render
        that outlives the request timeout is a 504 (a stream's answer is only its start: a timeout is the node's)."""
        request = self.http.build_request("POST", path, content=msgspec.msgpack.encode(job),
                                          headers={"content-type": MSGPACK, "x-request-id": job.request_id})
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


async def _chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body as it arrives; a connection lost midway is the node's failure."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        raise streaming.NodeGone(f"{type(exc).__name__}: {exc}") from exc
    finally:
        await response.aclose()


class LocalNode:
    """The standalone role's own engine pool, called in-process."""

    def __init__(self, pool: object, report: object, timeout: float = 600.0, keepalive: float = 10.0) -> None:
        self.pool = pool
        self.report = report  # () -> NodeReport, read fresh each time
        self.timeout, self.keepalive = timeout, keepalive

    async def render(self, job: RenderJob) -> RenderedImages:
        try:
            return await self.pool.render(job)
        except ApiError as error:
            if error.status == 429:
                raise NodeFull(error) from error
            raise

    async def open_stream(self, job: RenderJob) -> AsyncIterator[bytes]:
        try:
            return streaming.open_local(self.pool, job, self.timeout, self.keepalive)
        except ApiError as error:
            if error.status == 429:
                raise NodeFull(error) from error
            raise

    def full_error(self, model: str) -> ApiError:
        """The 429 of the model's full queue, as the pool words it."""
        return self.pool.queues[model].full_error()

    async def close(self) -> None:
        return None
