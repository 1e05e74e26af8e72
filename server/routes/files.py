"""GET /v1/images/files/{name}: the image behind a `url` response, until it expires.

Not behind the API key: the name is a 192-bit capability, like OpenAI's pre-signed URLs, so that stock
clients can download the URLs they are given."""

from __future__ import annotations

from litestar import Request, get
from litestar.response import File

from server.errors import ApiError, documented
from server.state import AppState


@get("/images/files/{name:str}", responses=documented(404),
     summary="Download a generated image (expires after the image TTL)")
async def image_file(name: str, request: Request) -> File:
    found = AppState.of(request).store.get(name)
    if found is None:
        raise ApiError(404, "no such image, or it has expired", param="name", code="image_not_found")
    path, content_type = found
    return File(path=path, media_type=content_type, content_disposition_type="inline", filename=name)
