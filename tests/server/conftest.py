"""A standalone server over the tiny models, shared by the server tests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.conftest import TINY
from tests.patience import PATIENCE
from tests.processes import ServerProcess


def wait_for_models(process: ServerProcess, expected: set[str], timeout: float = PATIENCE) -> None:
    """Readiness means one model can render; the tests want every model loaded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = httpx.get(f"{process.url}/v1/models", timeout=PATIENCE).json()["data"]
        if {model["id"] for model in listed} >= expected:
            return
        time.sleep(0.2)
    raise TimeoutError(f"models {expected} not all loaded after {timeout} s:\n{process.log()}")


@pytest.fixture(scope="session")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("server")
    process = ServerProcess("standalone", ["--models-dir", str(models_dir), "--images-dir", str(work / "images"),
                                           "--default-model", "tiny-sd15"], work).start()
    wait_for_models(process, set(TINY))
    yield process
    process.stop()


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=120)
