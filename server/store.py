"""Images behind `response_format=url`: files named by unguessable ids, valid for a time-to-live.

The id is 192 random bits; expiry is by file age, so it survives restarts. Expired files answer 404
at once and are deleted by a periodic sweep. Nothing is kept in memory: routers that share one
directory (a shared volume) serve each other's images, and any of them may sweep.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from pathlib import Path

from server.images import CONTENT_TYPES, EXTENSIONS

log = logging.getLogger("sdserve.server")

_NAME = re.compile(r"^[A-Za-z0-9_-]{32}\.(png|jpg|webp)$")
_TYPES = {ext: CONTENT_TYPES[fmt] for fmt, ext in EXTENSIONS.items()}


class ImageStore:
    def __init__(self, directory: str | Path, ttl: float) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ttl = ttl

    def put(self, data: bytes, output_format: str) -> str:
        name = f"{secrets.token_urlsafe(24)}.{EXTENSIONS[output_format]}"
        partial = self.directory / f".{name}.partial"
        partial.write_bytes(data)
        os.replace(partial, self.directory / name)
        return name

    def get(self, name: str) -> tuple[Path, str] | None:
        """(path, content type) of a live image, or None for unknown, malformed or expired names."""
        if not _NAME.match(name):
            return None
        path = self.directory / name
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        if age > self.ttl:
            path.unlink(missing_ok=True)
            return None
        return path, _TYPES[name.rsplit(".", 1)[1]]

    def sweep(self) -> int:
        """Delete expired images (and partial writes older than the TTL); returns how many."""
        deadline = time.time() - self.ttl
        removed = 0
        for path in self.directory.iterdir():
            # Only our own files: a shared volume (several routers) may hold others, like lost+found.
            if not (_NAME.match(path.name) or path.name.endswith(".partial")):
                continue
            try:
                if path.stat().st_mtime < deadline:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("image store: deleted %d expired images", removed)
        return removed
