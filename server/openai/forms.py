"""multipart/form-data bodies of the edit and variation routes, parsed before Litestar's own parser runs.

Litestar decodes every part that has no filename as UTF-8 text and fails with a UnicodeDecodeError (a 500)
when it is not: some clients send a file that way (`curl -F 'image=<photo.png'`). Here such a part is
taken as the file where the field is a file, and answered with a 400 naming the field elsewhere. The
parsed form goes where Litestar caches it, so the route's typed body is then built from it as usual.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from litestar import Request
from litestar.datastructures import UploadFile
from litestar.exceptions import ClientException
from litestar.types import Empty
from litestar.utils.scope.state import ScopeState
from multipart import MultipartSegment, ParserError, ParserLimitReached, PushMultipartParser

from server.errors import ApiError

FILE_FIELDS = frozenset({"image", "image[]", "mask"})


async def parse(request: Request) -> None:
    """A `before_request` hook: parse the form leniently and leave it for the route's body."""
    state = ScopeState.from_scope(request.scope)
    boundary = request.content_type[1].get("boundary", "").encode()
    if state.form is not Empty or not boundary:
        return  # Litestar reports a missing boundary itself
    fields: defaultdict[str, list[Any]] = defaultdict(list)
    try:
        with PushMultipartParser(boundary, max_segment_count=request.app.multipart_form_part_limit) as parser:
            segment: MultipartSegment | None = None
            data = bytearray()
            async for chunk in request.stream():
                for part in parser.parse(chunk):
                    if isinstance(part, MultipartSegment):
                        segment, data = part, bytearray()
                    elif part:
                        data.extend(part)
                    elif segment is not None:
                        fields[segment.name].append(await _value(segment, data))
                        segment = None
            if not parser.closed:
                raise ClientException("Invalid multipart/form-data: the body ended early")
    except ParserError as exc:
        await _close(fields)
        raise ClientException("Invalid multipart/form-data") from exc
    except ParserLimitReached:
        await _close(fields)
        raise ClientException("Invalid multipart/form-data: too many parts") from None
    except BaseException:
        await _close(fields)
        raise
    state.form = {name: values if len(values) > 1 else values[0] for name, values in fields.items()}


async def _value(segment: MultipartSegment, data: bytearray) -> str | UploadFile:
    if not segment.filename:
        try:
            return data.decode(segment.charset or "utf-8")
        except (UnicodeDecodeError, LookupError):
            if segment.name not in FILE_FIELDS:
                raise ApiError(400, f"'{segment.name}' is not text in its charset ({segment.charset or 'utf-8'})",
                               param=segment.name, code=f"invalid_{segment.name}") from None
    upload = UploadFile(content_type=segment.content_type or "application/octet-stream",
                        filename=segment.filename or segment.name, headers=dict(segment.headerlist))
    await upload.write(bytes(data))
    await upload.seek(0)
    return upload


async def _close(fields: dict[str, list[Any]]) -> None:
    for values in fields.values():
        for value in values:
            if isinstance(value, UploadFile):
                await value.close()
