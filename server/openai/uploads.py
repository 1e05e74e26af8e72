"""Uploaded images, read and size-checked: multipart file parts (`upload`), and the image URLs of
`/v1/images/edits` as application/json (`read_image`: `images: [{image_url}]` and `mask: {image_url}`).

`data:` URLs are always read (with the upload size limit). `http(s)` URLs are fetched (`fetch.py`) only
where the operator enabled it: fetching lets a client make this server request addresses on its network.
`file_id` is refused: there is no Files API here. Refusals answer 400 naming the field.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from litestar.datastructures import UploadFile

from server.errors import ApiError
from server.openai import fetch
from server.protocol import ImageRef
from server.settings import Settings


@dataclass(frozen=True)
class Upload:
    """An uploaded file part, already read: its bytes and the field it came in."""

    data: bytes
    param: str


async def upload(part: Any, param: str, limit: int) -> Upload:
    """A multipart file part (or the first of several), read and size-checked."""
    if isinstance(part, list):
        part = part[0] if part else None
    if part is None:
        raise ApiError(400, f"missing required parameter '{param}' (a file)", param=param,
                       code="missing_required_parameter")
    if not isinstance(part, UploadFile):
        raise ApiError(400, f"'{param}' must be a file upload, not a form field", param=param, code=f"invalid_{param}")
    data = await part.read(limit + 1)  # enough to know it is too large
    if len(data) > limit:
        raise ApiError(413, f"'{param}' is over the limit of {limit} bytes", param=param, code="file_too_large")
    return Upload(data, param)


async def read_image(ref: ImageRef | None, param: str, settings: Settings) -> Upload | None:
    if ref is None:
        return None
    if ref.file_id is not None:
        raise ApiError(400, f"'{param}' uses file_id, but this server has no Files API; send image_url with a "
                       "data: URL", param=param, code="unsupported_file_id")
    url = ref.image_url
    if not url:
        raise ApiError(400, f"'{param}' needs an image_url", param=param, code=f"invalid_{param}")
    if url[:8].lower().startswith(("http://", "https://")):
        if not settings.fetch_image_urls:
            raise ApiError(400, f"'{param}': fetching http(s) image URLs is not enabled on this server; send a "
                           "data: URL", param=param, code="image_url_not_allowed")
        return Upload(await fetch.fetch(url, param, settings), param)
    limit = settings.max_upload_bytes
    head, comma, payload = url.partition(",")
    if not head.startswith("data:") or not head.endswith(";base64") or not comma:
        raise ApiError(400, f"'{param}': image_url must be a data:image/…;base64,… URL", param=param,
                       code=f"invalid_{param}")
    if len(payload) * 3 // 4 > limit:
        raise ApiError(413, f"'{param}' is over the {limit}-byte upload limit", param=param, code="file_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"'{param}': the data URL is not valid base64", param=param,
                       code=f"invalid_{param}") from exc
    return Upload(data, param)
