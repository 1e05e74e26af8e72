"""Images behind `response_format=url`: files named by unguessable ids, valid for a time-to-live.

The id is 192 random bits; expiry is by file age, so it survives restarts. Expired files answer 404
at once and are deleted by a periodic sweep, which also keeps the folder under an optional size cap
(oldest first). The sweep touches only names this store writes: the folder may be a volume root holding
`lost+found` or an operator's files.
Nothing is kept in memory: routers that share one directory (a shared volume) serve each other's images,
and any of them may sweep.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from server.images import CONTENT_TYPES, EXTENSIONS
from server.settings import InvalidSettings

log = logging.getLogger("sdserve.server")

_NAME = re.compile(r"^[A-Za-z0-9_-]{32}\.(png|jpg|webp)$")
_PARTIAL = re.compile(r"^\.[A-Za-z0-9_-]{32}\.(png|jpg|webp)\.partial$")
_TYPES = {ext: CONTENT_TYPES[fmt] for fmt, ext in EXTENSIONS.items()}


class ImageStore:
    def __init__(self, directory: str | Path, ttl: float, max_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidSettings(f"images_dir {str(directory)!r} cannot be created: {exc}") from exc
        self.ttl, self.max_bytes = ttl, max_bytes

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
        """Delete our expired images and stale partial writes, then our oldest images beyond the size cap;
        returns how many. No entry (a folder, a vanished or undeletable file) stops the sweep."""
        deadline = time.time() - self.ttl
        live: list[tuple[float, int, Path]] = []
        removed = 0
        for path, stat in self._ours():
            if stat.st_mtime < deadline:
                removed += _delete(path)
            elif _NAME.match(path.name):
                live.append((stat.st_mtime, stat.st_size, path))
        if self.max_bytes is not None:
            total = sum(size for _, size, _ in live)
            for _, size, path in sorted(live):
                if total <= self.max_bytes:
                    break
                removed += _delete(path)
                total -= size
        if removed:
            log.info("image store: deleted %d expired or over-the-cap images", removed)
        return removed

    def _ours(self) -> Iterator[tuple[Path, os.stat_result]]:
        """Our files (images and partial writes) with their stat; everything else is not ours to judge."""
        try:
            entries = list(os.scandir(self.directory))
        except OSError as exc:  # the folder vanished or is unreadable: try again next sweep
            log.warning("image store: cannot list %s: %s", self.directory, exc)
            return
        for entry in entries:
            if not (_NAME.match(entry.name) or _PARTIAL.match(entry.name)):
                continue
            try:
                if entry.is_file(follow_symlinks=False):
                    yield Path(entry.path), entry.stat(follow_symlinks=False)
            except OSError:
                continue


def _delete(path: Path) -> int:
    try:
        path.unlink()
    except OSError as exc:  # gone already, or not ours to delete after all
        log.debug("image store: cannot delete %s: %s", path, exc)
        return 0
    return 1
