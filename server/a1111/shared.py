"""A1111 state every front door sees, as files in a folder the replicas share (`<--images-dir>/a1111`: under
Kubernetes the routers' ReadWriteMany images volume). A1111 keeps one server's options and one current job;
behind a Service with several routers a client's next call may land on another replica, so:

    options.json          the options POST /options set (read on every render and GET /options)
    tasks/<client>.json   the client's render in progress, as /progress answers it: written by the front
                          door running it when it starts and after each preview, removed when it ends
    tasks/<client>.stop   an /interrupt that reached another replica: the running front door polls for it

Writes go to a temporary file renamed into place, so a reader sees a whole file or the previous one; the
options' read-modify-write holds an exclusive lock. A progress file outlives a crashed replica by at most
--request-timeout (its `expires`). Clients are hashed into file names.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from server.a1111.protocol import ProgressResponse


class Published(msgspec.Struct):
    expires: float  # time.time() after which the writer is presumed gone
    report: ProgressResponse


class SharedState:
    def __init__(self, folder: Path, lifetime: float) -> None:
        self.folder, self.lifetime = folder, lifetime
        (folder / "tasks").mkdir(parents=True, exist_ok=True)

    # --- options ------------------------------------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        try:
            return msgspec.json.decode((self.folder / "options.json").read_bytes(), type=dict[str, Any])
        except FileNotFoundError:
            return {}

    def update_options(self, update: dict[str, Any], check: Callable[[dict[str, Any]], None]) -> None:
        """Merge `update` into the options, `check`ing the result first (it raises to refuse)."""
        with self._locked():
            merged = {**self.options(), **update}
            check(merged)
            self._write(self.folder / "options.json", msgspec.json.encode(merged))

    # --- renders in progress ------------------------------------------------------------------------------

    def publish(self, client: str, report: ProgressResponse) -> None:
        self._write(self._task(client, "json"), msgspec.json.encode(Published(time.time() + self.lifetime, report)))

    def withdraw(self, client: str) -> None:
        self._task(client, "json").unlink(missing_ok=True)

    def progress(self, client: str) -> ProgressResponse | None:
        try:
            published = msgspec.json.decode(self._task(client, "json").read_bytes(), type=Published)
        except (FileNotFoundError, msgspec.DecodeError):
            return None
        return published.report if published.expires > time.time() else None

    def request_interrupt(self, client: str) -> None:
        self._task(client, "stop").touch()

    def take_interrupt(self, client: str) -> bool:
        """Whether an interrupt for `client` waits (and it is taken: the next render starts afresh)."""
        try:
            self._task(client, "stop").unlink()
        except FileNotFoundError:
            return False
        return True

    # --- files --------------------------------------------------------------------------------------------

    def _task(self, client: str, suffix: str) -> Path:
        return self.folder / "tasks" / f"{hashlib.sha256(client.encode()).hexdigest()[:32]}.{suffix}"

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_bytes(data)
        partial.replace(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / "options.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
