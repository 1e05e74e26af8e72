"""A server's life around its requests: loading models (and failing to), the default model, the queue's
Retry-After estimate, background tasks, and how long SIGTERM waits."""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.metrics import Metrics
from server.node.pool import EnginePool
from server.settings import Settings
from server.supervisor import supervise
from tests.faults import StepGate
from tests.patience import PATIENCE, until
from tests.processes import ROOT, ServerProcess
from tests.server.test_operations import metric, wait_until_idle

GEN = "/v1/images/generations"


def broken_copy(good: Path, target: Path) -> Path:
    """A copy of a model whose UNet file has the right size and garbage bytes."""
    shutil.copytree(good, target)
    unet = target / "unet" / "model.onnx"
    unet.write_bytes(b"\x07" * unet.stat().st_size)
    return target


def test_a_model_that_fails_to_load_is_reported_and_the_others_still_load(models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    broken_copy(models_dir / "tiny-sd15", models / "aaa-broken")  # first by name: loaded first
    (models / "tiny-sd15").symlink_to(models_dir / "tiny-sd15")
    server = ServerProcess("standalone", ["--models-dir", str(models), "--images-dir", str(tmp_path / "images")],
                           tmp_path).start()
    try:
        ready = httpx.get(server.url + "/readyz").json()
        assert ready["models"] == ["tiny-sd15"]
        assert set(ready["failed_models"]) == {"aaa-broken"}
        assert metric(server, "sdserve_model_load_failures_total", 'model="aaa-broken"') == 1
        assert server.log_lines("model aaa-broken failed to load")
        named = httpx.post(server.url + GEN, json={"model": "tiny-sd15", "prompt": "p", "size": "64x64", "steps": 1},
                           timeout=60)
        assert named.status_code == 200
        # The default was decided at start-up (the first model by name), not by which models loaded.
        unnamed = httpx.post(server.url + GEN, json={"prompt": "p", "size": "64x64", "steps": 1}, timeout=60)
        assert unnamed.status_code == 503, unnamed.text
        assert "aaa-broken" in unnamed.json()["error"]["message"]
    finally:
        server.kill()


def test_the_loader_survives_any_exception(models_dir: Path) -> None:
    """An absurd thread count makes ONNX Runtime raise a TypeError, not one of our errors."""
    settings = Settings(models_dir=str(models_dir), models=["tiny-sd15", "tiny-sd21"], backend="cpu", threads=2**40)
    pool = EnginePool(settings, Metrics())

    async def load_all() -> None:  # the start-up loads run on the event loop
        pool.start()
        await asyncio.wait_for(pool.wait_loaded(), 60)

    asyncio.run(load_all())
    assert pool.states.keys() == {"tiny-sd15", "tiny-sd21"}
    assert set(pool.failed()) == {"tiny-sd15", "tiny-sd21"}  # each tried and reported; none left "loading"
    # ONNX Runtime's TypeError, reported (the backend wraps it as an EngineFailure so that `auto` falls back)
    assert all("incompatible function arguments" in why for why in pool.failed().values()), pool.failed()


def test_a_mistyped_default_model_stops_a_standalone_server(models_dir: Path) -> None:
    command = [sys.executable, "-m", "server", "standalone", "--models-dir", str(models_dir),
               "--default-model", "tiny-sd51", "--port", "1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--default-model 'tiny-sd51' is not a model here" in done.stderr
    assert "tiny-sd15" in done.stderr.splitlines()[-1]  # says what there is


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> StepGate:
    return StepGate(tmp_path_factory.mktemp("gate"))


@pytest.fixture(scope="module")
def lean(models_dir: Path, tmp_path_factory: pytest.TempPathFactory, gate: StepGate) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("lean")
    process = ServerProcess("standalone", ["--models-dir", str(models_dir), "--model", "tiny-sd15",
                                           "--images-dir", str(work / "images"), "--queue-depth", "1",
                                           "--request-timeout", "300", "--drain-timeout", "2"], work,
                            env=gate.env).start()
    yield process
    process.kill()


BLOCKER = {"prompt": "long", "size": "64x64", "steps": 40, "response_format": "b64_json"}
QUICK = {"prompt": "quick", "size": "64x64", "steps": 1, "response_format": "b64_json"}


async def _until(server: ServerProcess, name: str, value: float) -> None:
    await asyncio.to_thread(until, f"{name} reaches {value:g}", lambda: metric(server, name) >= value)


def test_retry_after_is_the_running_renders_remaining_steps(lean: ServerProcess, gate: StepGate) -> None:
    """One 40-step render runs (every step at least 0.2 s long, held after its 3rd), one waits: the next
    request is refused until the running one ends, 37 steps of at least 0.2 s from now, and Retry-After says
    so. The message is the queue's own (there are no nodes on a standalone server)."""
    wait_until_idle(lean)
    step = 0.2

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=lean.url, timeout=300) as client:
            blocker = asyncio.ensure_future(client.post(GEN, json=BLOCKER))
            await asyncio.to_thread(gate.wait_held)
            queued = asyncio.ensure_future(client.post(GEN, json=QUICK))
            await _until(lean, "sdserve_queue_depth", 1)
            refused = await client.post(GEN, json=QUICK)
            for task in (blocker, queued):
                task.cancel()  # the client goes away: the server drops both
            return refused

    gate.slow(step)
    gate.hold(after_steps=3)
    try:
        refused = asyncio.run(scenario())
    finally:
        gate.release()
        gate.slow(0)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= math.ceil(37 * step)
    message = refused.json()["error"]["message"]
    assert "the queue for model 'tiny-sd15' is full" in message and "node" not in message, message
    assert f"retry in about {refused.headers['retry-after']} s" in message


def test_what_outlasts_the_drain_timeout_is_answered_503_and_the_server_exits_in_time(lean: ServerProcess,
                                                                                     gate: StepGate) -> None:
    """A render held running past --drain-timeout (2 s here), and one waiting behind it: on SIGTERM both are
    answered 503 `draining` with the OpenAI error body at the drain timeout (never a cut connection or a bare
    500), and the server exits cleanly (the running render stops at its next step; a process exiting inside
    ONNX Runtime would abort)."""
    wait_until_idle(lean)

    async def scenario() -> tuple[int, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=lean.url, timeout=300) as client:
            running = asyncio.ensure_future(client.post(GEN, json=BLOCKER))
            await asyncio.to_thread(gate.wait_held)
            queued = asyncio.ensure_future(client.post(GEN, json=BLOCKER))
            await _until(lean, "sdserve_queue_depth", 1)
            lean.signal(signal.SIGTERM)
            exit_status = await asyncio.to_thread(lean.process.wait, PATIENCE)  # TimeoutExpired if it waits longer
            return exit_status, [await running, await queued]

    gate.hold()
    try:
        exit_status, answers = asyncio.run(scenario())
    finally:
        gate.release()
    assert exit_status == 0
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "draining" and answer.headers["retry-after"]
    assert lean.log_lines("drain timeout (2 s): 2 render(s) unfinished")
    assert "Traceback" not in lean.log()


def test_a_failing_background_task_is_logged_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise RuntimeError(f"fault {len(runs)}")
        await asyncio.Event().wait()

    async def scenario() -> None:
        task = supervise("flaky", flaky, restart_after=0.01)
        while len(runs) < 3:
            await asyncio.sleep(0.01)
        task.cancel()

    with caplog.at_level(logging.ERROR, logger="sdserve.server"):
        asyncio.run(asyncio.wait_for(scenario(), PATIENCE))
    assert len(runs) == 3
    failures = [r for r in caplog.records if "background task flaky failed" in r.getMessage()]
    assert len(failures) == 2 and all(r.exc_info for r in failures)
