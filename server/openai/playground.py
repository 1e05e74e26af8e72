"""GET /: the playground, a browser page over the public API. Static files shipped in the package
(server/playground/): plain HTML, CSS and JavaScript modules, nothing fetched from elsewhere.

The page is open (it holds no secrets); its API calls go to /v1 with the key the user types in."""

from __future__ import annotations

from pathlib import Path

from litestar import Response, Router, get
from litestar.datastructures import CacheControlHeader
from litestar.enums import MediaType
from litestar.static_files import create_static_files_router

FILES = Path(__file__).resolve().parents[1] / "playground"
# The page loads only its own files; images come back as data: URLs and downloads are blob: URLs.
HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
# Small files that change with each release: revalidate rather than serve a stale page after an upgrade.
REVALIDATE = CacheControlHeader(no_cache=True)


@get("/", include_in_schema=False, cache_control=REVALIDATE)
async def page() -> Response[bytes]:
    return Response((FILES / "index.html").read_bytes(), media_type=MediaType.HTML, headers=HEADERS)


async def _with_headers(response: Response) -> Response:
    response.headers.update(HEADERS)
    return response


def handlers() -> list[object]:
    """The page at / and its files under /playground/."""
    assets: Router = create_static_files_router("/playground", [FILES], name="playground", cache_control=REVALIDATE,
                                                after_request=_with_headers)
    return [page, assets]
