"""Real server processes on loopback for the server and router tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.patience import PATIENCE

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m server ROLE …` in its own process group, its output in a log file."""

    def __init__(self, role: str, args: list[str], workdir: Path, env: dict[str, str] | None = None,
                 port: int | None = None, name: str | None = None) -> None:
        self.role, self.args, self.workdir = role, args, workdir
        self.port = port or free_port()
        self.name = name or f"{role}-{self.port}"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = workdir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready: bool = True, timeout: float = PATIENCE) -> ServerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps writing after we return
        command = [sys.executable, "-m", "server", self.role, "--host", "127.0.0.1", "--port", str(self.port),
                   *self.args]
        self.process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        try:
            self.wait(ready=ready, timeout=timeout)
        except BaseException:  # a server that never came up must not outlive the test session
            self.kill()
            raise
        return self

    def wait(self, ready: bool = True, timeout: float = PATIENCE) -> None:
        """Until /healthz (or /readyz with `ready`) answers 200."""
        deadline = time.monotonic() + timeout
        path = "/readyz" if ready else "/healthz"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not up after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self, *needles: str, timeout: float = PATIENCE) -> list[str]:
        """The log lines holding every needle, waiting until there is one: a server writes its access line
        as the response finishes, so the client may see the answer first."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.log().splitlines() if all(n in line for n in needles)]
            if lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def stop(self, timeout: float = PATIENCE) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.process is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None
