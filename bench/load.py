"""`bench http`: HTTP load against a running server or router, as clients would send it.

For each concurrency level, that many clients send requests back to back until the level's total
is sent, in a fixed mix of routes. Every request is answered or counted as an error (by status, or
"timeout"/"connection"); nothing is retried. With the admin key, the router's `/v0/nodes` counters
are read before and after each level to show how the work spread over nodes.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec
import numpy as np
from PIL import Image

from bench import hardware, report
from bench.stats import percentile

ROUTES = ("generations", "edits", "variations")


class HttpSettings(msgspec.Struct, frozen=True, kw_only=True):
    url: str  # the server's base URL, e.g. http://127.0.0.1:8080
    concurrency: list[int] = msgspec.field(default_factory=lambda: [1, 4])
    requests: int = 20  # per concurrency level
    mix: dict[str, int] = msgspec.field(default_factory=lambda: {"generations": 1})  # route → weight
    model: str | None = None
    size: str = "256x256"
    steps: int | None = None
    n: int = 1
    response_format: str = "b64_json"
    api_key: str | None = None
    admin_key: str | None = None
    timeout: float = 600.0
    seed: int = 0
    stream: bool = False  # generations and edits as event streams (variations have none)
    partial_images: int = 2


class Outcome(msgspec.Struct, frozen=True):
    route: str
    status: str  # the HTTP status, or "timeout" / "connection"
    seconds: float
    images: int
    first_partial: float | None = None  # streams: seconds to the first partial image event
    error: str | None = None  # not answered 200: the start of the answer's body, or what went wrong


class Level(msgspec.Struct, kw_only=True):
    concurrency: int
    requests: int
    seconds: float  # wall time of the level
    images: int
    images_per_second: float
    requests_per_second: float
    latency_p50: float | None  # seconds, over the requests answered 200
    latency_p95: float | None
    latency_p99: float | None
    first_partial_p50: float | None = None  # streams: seconds to the first partial image, over 200 answers
    first_partial_p95: float | None = None
    statuses: dict[str, int] = msgspec.field(default_factory=dict)
    by_route: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    nodes: dict[str, int] | None = None  # node id → requests the router sent it during the level
    first_error: str | None = None  # the first request not answered 200: its status and body


class HttpResult(msgspec.Struct, kw_only=True):
    kind: str = "http"
    started: str
    settings: HttpSettings
    hardware: hardware.Hardware
    versions: dict[str, str]
    models: list[str]
    levels: list[Level]


def run(settings: HttpSettings, progress: Callable[[str], None] | None = None) -> HttpResult:
    return asyncio.run(_run(settings, progress or (lambda _label: None)))


async def _run(settings: HttpSettings, tick: Callable[[str], None]) -> HttpResult:
    started = report.now()
    base = settings.url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    limits = httpx.Limits(max_connections=max(settings.concurrency) + 2)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=settings.timeout, limits=limits) as client:
        models = await _models(client)
        levels = []
        for concurrency in settings.concurrency:
            before = await _node_counts(client, settings.admin_key)
            outcomes, seconds = await _level(client, settings, concurrency, tick)
            after = await _node_counts(client, settings.admin_key)
            levels.append(_summarize(concurrency, outcomes, seconds, _spread(before, after)))
    masked = msgspec.structs.replace(settings, url=_without_credentials(settings.url),
                                     api_key=_mask(settings.api_key), admin_key=_mask(settings.admin_key))
    return HttpResult(started=started, settings=masked, hardware=hardware.describe(),
                      versions=hardware.versions("sdserve", "httpx"), models=models, levels=levels)


async def _level(client: httpx.AsyncClient, settings: HttpSettings, concurrency: int,
                 tick: Callable[[str], None]) -> tuple[list[Outcome], float]:
    routes = itertools.cycle(_route_cycle(settings.mix))
    numbers = iter(range(settings.requests))
    bodies = _Bodies(settings)
    outcomes: list[Outcome] = []

    async def client_loop() -> None:
        for number in numbers:  # one shared iterator: each request number is taken once
            outcomes.append(await _send(client, next(routes), bodies, number))
            tick(f"concurrency {concurrency}")

    begun = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return outcomes, time.perf_counter() - begun


async def _send(client: httpx.AsyncClient, route: str, bodies: _Bodies, number: int) -> Outcome:
    begun = time.perf_counter()
    if bodies.settings.stream and route != "variations":
        return await _send_stream(client, route, bodies, number, begun)
    try:
        if route == "generations":
            response = await client.post("/v1/images/generations", json=bodies.json(number))
        else:
            response = await client.post(f"/v1/images/{route}", data=bodies.form(route, number),
                                         files=bodies.files(route))
    except httpx.TimeoutException as exc:
        return Outcome(route, "timeout", time.perf_counter() - begun, 0, error=_why(exc))
    except httpx.HTTPError as exc:  # refused, reset, a broken body: whatever it was, no answer
        return Outcome(route, "connection", time.perf_counter() - begun, 0, error=_why(exc))
    seconds = time.perf_counter() - begun
    if response.status_code != 200:
        return Outcome(route, str(response.status_code), seconds, 0, error=_body(response.text))
    try:
        data = response.json()["data"]
        return Outcome(route, "200", seconds, len(data) if isinstance(data, list) else 0)
    except (ValueError, KeyError, TypeError):
        return Outcome(route, "invalid_json", seconds, 0, error=_body(response.text))


async def _send_stream(client: httpx.AsyncClient, route: str, bodies: _Bodies, number: int,
                       begun: float) -> Outcome:
    """A streamed request: the time to its first partial image event, and to its last completed event."""
    if route == "generations":
        request = client.build_request("POST", "/v1/images/generations", json=bodies.json(number) | bodies.streamed())
    else:
        form = bodies.form(route, number) | {k: str(v).lower() for k, v in bodies.streamed().items()}
        request = client.build_request("POST", f"/v1/images/{route}", data=form, files=bodies.files(route))
    first, completed, error = None, 0, None
    try:
        response = await client.send(request, stream=True)
        try:
            if response.status_code != 200:
                body = _body((await response.aread()).decode(errors="replace"))
                return Outcome(route, str(response.status_code), time.perf_counter() - begun, 0, error=body)
            async for line in response.aiter_lines():
                if line.startswith("event: ") and line.endswith(".partial_image") and first is None:
                    first = time.perf_counter() - begun
                completed += line.startswith("event: ") and line.endswith(".completed")
                if error == "" and line.startswith("data: "):  # the error event's data
                    error = _body(line.removeprefix("data: "))
                if line == "event: error":
                    error = ""
        finally:
            await response.aclose()
    except httpx.TimeoutException as exc:
        return Outcome(route, "timeout", time.perf_counter() - begun, 0, error=_why(exc))
    except httpx.HTTPError as exc:
        return Outcome(route, "connection", time.perf_counter() - begun, 0, error=_why(exc))
    status = "error_event" if error is not None else "200"
    return Outcome(route, status, time.perf_counter() - begun, completed, first, error=error or None)


def _body(text: str) -> str:
    """Enough of an error answer to say why (OpenAI's error bodies are one short JSON object)."""
    return " ".join(text.split())[:500]


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Bodies:
    """Request bodies: JSON for generations, multipart with a PNG for edits (its transparent square
    is the area to repaint) and variations."""

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        width, height = (int(side) for side in settings.size.split("x")) if "x" in settings.size else (256, 256)
        rng = np.random.default_rng(settings.seed)
        rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        rgba[..., 3] = 255
        rgba[height // 4: 3 * height // 4, width // 4: 3 * width // 4, 3] = 0
        self.pngs = {"edits": _png(Image.fromarray(rgba, "RGBA")),
                     "variations": _png(Image.fromarray(rgba[..., :3].copy(), "RGB"))}

    def fields(self, number: int) -> dict[str, Any]:
        s = self.settings
        values: dict[str, Any] = {"size": s.size, "n": s.n, "response_format": s.response_format,
                                  "seed": s.seed + 1000 * number}
        if s.model:
            values["model"] = s.model
        if s.steps:
            values["steps"] = s.steps
        return values

    def streamed(self) -> dict[str, Any]:
        return {"stream": True, "partial_images": self.settings.partial_images}

    def json(self, number: int) -> dict[str, Any]:
        return self.fields(number) | {"prompt": f"a lighthouse on a cliff at dusk, request {number}"}

    def form(self, route: str, number: int) -> dict[str, str]:
        values = {key: str(value) for key, value in self.fields(number).items()}
        return values | ({"prompt": "the same scene in winter"} if route == "edits" else {})

    def files(self, route: str) -> dict[str, tuple[str, bytes, str]]:
        return {"image": ("input.png", self.pngs[route], "image/png")}


def _mask(secret: str | None) -> str | None:
    return None if secret is None else "***"


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))) \
        if parts.username or parts.password else url


def errors(result: HttpResult) -> int:
    """Requests over every level that were not answered 200."""
    return sum(count for level in result.levels for status, count in level.statuses.items() if status != "200")


def first_error(result: HttpResult) -> str | None:
    """The first request not answered 200, over every level: its status and body."""
    return next((level.first_error for level in result.levels if level.first_error), None)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _route_cycle(mix: dict[str, int]) -> list[str]:
    """The mix as a repeating sequence, routes interleaved: {"generations": 2, "edits": 1} → g, e, g."""
    remaining = {route: weight for route, weight in mix.items() if weight > 0}
    cycle = []
    while remaining:
        for route in list(remaining):
            cycle.append(route)
            remaining[route] -= 1
            if remaining[route] == 0:
                del remaining[route]
    return cycle


async def _models(client: httpx.AsyncClient) -> list[str]:
    try:
        response = await client.get("/v1/models")
        return [m["id"] for m in response.json()["data"]] if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return []


async def _node_counts(client: httpx.AsyncClient, admin_key: str | None) -> dict[str, int] | None:
    """The router's per-node request counters, or None without an admin key or `/v0/nodes`."""
    if not admin_key:
        return None
    try:
        response = await client.get("/v0/nodes", headers={"Authorization": f"Bearer {admin_key}"})
        if response.status_code != 200:
            return None
        return {node["node_id"]: int(node["requests"]) for node in response.json()["data"]}
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def _spread(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    return {node: count - before.get(node, 0) for node, count in sorted(after.items())}


def _summarize(concurrency: int, outcomes: list[Outcome], seconds: float, nodes: dict[str, int] | None) -> Level:
    latencies = [o.seconds for o in outcomes if o.status == "200"]
    firsts = [o.first_partial for o in outcomes if o.status == "200" and o.first_partial is not None]
    images = sum(o.images for o in outcomes)
    failed = next((o for o in outcomes if o.status != "200"), None)
    by_route: dict[str, dict[str, int]] = {}
    for outcome in outcomes:
        by_route.setdefault(outcome.route, Counter())[outcome.status] += 1
    return Level(concurrency=concurrency, requests=len(outcomes), seconds=seconds, images=images,
                 images_per_second=images / seconds if seconds else 0.0,
                 requests_per_second=len(outcomes) / seconds if seconds else 0.0,
                 latency_p50=percentile(latencies, 50), latency_p95=percentile(latencies, 95),
                 latency_p99=percentile(latencies, 99), first_partial_p50=percentile(firsts, 50),
                 first_partial_p95=percentile(firsts, 95),
                 statuses=dict(sorted(Counter(o.status for o in outcomes).items())),
                 by_route={route: dict(sorted(counts.items())) for route, counts in sorted(by_route.items())},
                 nodes=nodes, first_error=f"{failed.status}: {failed.error}" if failed else None)


def markdown(result: HttpResult) -> str:
    s = result.settings
    mix = ", ".join(f"{route} {weight}" for route, weight in s.mix.items())
    head = (f"**{s.url}** ({', '.join(result.models) or 'no models listed'}): {s.requests} requests per level, "
            f"mix {mix}, size {s.size}, n {s.n}, {s.steps or 'default'} steps; {result.started}")
    streamed = s.stream
    rows = [[level.concurrency, level.requests, level.seconds, level.images_per_second,
             *([level.first_partial_p50, level.first_partial_p95] if streamed else []), level.latency_p50,
             level.latency_p95, level.latency_p99, ", ".join(f"{k}: {v}" for k, v in level.statuses.items()),
             ", ".join(f"{k}: {v}" for k, v in level.nodes.items()) if level.nodes is not None else None]
            for level in result.levels]
    first = ["first partial p50 s", "first partial p95 s"] if streamed else []
    final = "final " if streamed else ""
    if streamed:
        head += f"; streamed, {s.partial_images} partial images"
    lines = [head, "", report.table(
        ["concurrency", "requests", "seconds", "images/s", *first, f"{final}p50 s", f"{final}p95 s", f"{final}p99 s",
         "statuses", "per node"], rows)]
    failure = first_error(result)
    return "\n".join([*lines, "", f"First request not answered 200: {failure}"] if failure else lines)


def figure(result: HttpResult) -> Any:
    """Throughput and latency percentiles against concurrency."""
    fig, (throughput, latency) = report.new_figure(ncols=2, width=11.0)
    levels = result.levels
    x = [level.concurrency for level in levels]
    throughput.plot(x, [level.images_per_second for level in levels], marker="o")
    throughput.set_xlabel("concurrent clients")
    throughput.set_ylabel("images / s")
    throughput.set_title("throughput")
    for name in ("p50", "p95", "p99"):
        values = [getattr(level, f"latency_{name}") for level in levels]
        latency.plot(x, [v if v is not None else float("nan") for v in values], marker="o", label=name)
    latency.set_xlabel("concurrent clients")
    latency.set_ylabel("seconds")
    latency.set_title("latency of 200 answers")
    latency.legend()
    for axes in (throughput, latency):
        axes.set_ylim(bottom=0)  # a zero baseline: differences look as large as they are
        axes.set_xticks(x)
    return fig
