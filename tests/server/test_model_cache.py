"""Models as a cache: a server knows every model folder without loading it, loads on first request within
--max-loaded-models / --max-loaded-bytes, unloads the least recently used idle model, never one in use, picks
up folders added or removed (rescan), and maps AUTOMATIC1111's checkpoint routes onto all this."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults import StepGate, environment, until
from tests.processes import ServerProcess

GEN = "/v1/images/generations"
BODY = {"prompt": "a lighthouse", "size": "64x64", "steps": 2}


@pytest.fixture
def two_models(tiny_model: Callable[[str], Path], tmp_path: Path) -> Path:
    """A models folder of its own holding tiny-sd15 and tiny-sd21 (links to the session's exports)."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("tiny-sd15", "tiny-sd21"):
        (models / name).symlink_to(tiny_model(name))
    return models


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def run(models: Path, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
        process = ServerProcess("standalone", ["--models-dir", str(models), "--images-dir", str(tmp_path / "images"),
                                               *args], tmp_path, env=env)
        started.append(process)
        return process.start()

    yield run
    for process in started:
        process.kill()


def states(server: ServerProcess) -> dict[str, dict]:
    listing = httpx.get(server.url + "/v0/models", timeout=10)
    assert listing.status_code == 200, listing.text
    return {model["id"]: model for model in listing.json()["data"]}


def generate(server: ServerProcess, model: str) -> httpx.Response:
    return httpx.post(server.url + GEN, json={**BODY, "model": model}, timeout=120)


def test_one_loaded_model_serves_both_in_turn_unloading_the_idle_one(two_models: Path, start: Callable) -> None:
    server = start(two_models, "--max-loaded-models", "1")
    before = states(server)
    assert {name: model["state"] for name, model in before.items()} == {"tiny-sd15": "available",
                                                                        "tiny-sd21": "available"}
    assert not before["tiny-sd15"]["measured"] and before["tiny-sd15"]["bytes"] > 0  # its files, until it loads
    listed = {m["id"] for m in httpx.get(server.url + "/v1/models", timeout=10).json()["data"]}
    assert listed == {"tiny-sd15", "tiny-sd21"}  # everything servable, loaded or not
    for model, other in (("tiny-sd15", "tiny-sd21"), ("tiny-sd21", "tiny-sd15"), ("tiny-sd15", "tiny-sd21")):
        answer = generate(server, model)
        assert answer.status_code == 200, answer.text
        now = states(server)
        assert (now[model]["state"], now[other]["state"]) == ("loaded", "available"), now
        assert now[model]["measured"] and now[model]["bytes"] > 0
    assert server.log_lines("model tiny-sd15 unloaded: to make room for tiny-sd21")
    assert server.log_lines("model tiny-sd21 unloaded: to make room for tiny-sd15")


def test_a_model_in_use_is_not_unloaded(two_models: Path, start: Callable, tmp_path: Path) -> None:
    gate = StepGate(tmp_path / "gate")
    server = start(two_models, "--max-loaded-models", "1", env=gate.env)
    gate.hold(after_steps=1)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(generate, server, "tiny-sd15")
        gate.wait_held(1)  # tiny-sd15 is rendering
        second = pool.submit(generate, server, "tiny-sd21")
        until("tiny-sd21 waits for room", lambda: states(server)["tiny-sd21"]["state"] == "loading")
        busy = httpx.post(server.url + "/v0/models/tiny-sd15/unload", timeout=10)
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "model_busy", busy.text
        now = states(server)
        assert (now["tiny-sd15"]["state"], now["tiny-sd15"]["running"]) == ("loaded", 1), now
        assert now["tiny-sd21"]["state"] == "loading" and not first.done()
        gate.release()
        assert first.result().status_code == 200, first.result().text
        assert second.result().status_code == 200, second.result().text
    now = states(server)
    assert (now["tiny-sd15"]["state"], now["tiny-sd21"]["state"]) == ("available", "loaded"), now


def test_concurrent_first_requests_load_the_model_once(two_models: Path, start: Callable, tmp_path: Path) -> None:
    faults = tmp_path / "faults"
    faults.mkdir()
    server = start(two_models, "--max-loaded-models", "1", env=environment(faults))
    (faults / "load-pause").touch()
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = [pool.submit(generate, server, "tiny-sd15") for _ in range(4)]
            until("the four requests wait for one load", lambda: states(server)["tiny-sd15"]["waiting"] == 4)
            assert states(server)["tiny-sd15"]["state"] == "loading"
            (faults / "load-pause").unlink()
            assert [a.result().status_code for a in answers] == [200] * 4, [a.result().text for a in answers]
    finally:
        (faults / "load-pause").unlink(missing_ok=True)
    assert len(server.log_lines("loaded tiny-sd15 (")) == 1, server.log()
    assert len(server.log_lines("model tiny-sd15 ready")) == 1


def test_a_budget_smaller_than_a_model_fails_its_load_clearly_and_the_server_stays_up(two_models: Path,
                                                                                      start: Callable) -> None:
    server = start(two_models, "--max-loaded-bytes", "1000")
    for _ in range(2):  # the second answer is the same, without a second try
        answer = generate(server, "tiny-sd15")
        assert answer.status_code == 507, answer.text
        error = answer.json()["error"]
        assert (error["code"], error["param"]) == ("model_too_large", "model")
        assert "--max-loaded-bytes is 1000" in error["message"]
    now = states(server)
    assert now["tiny-sd15"]["state"] == "failed" and "memory budget" in now["tiny-sd15"]["error"]
    assert not server.log_lines("loaded tiny-sd15 (")  # refused before loading: its files alone are too large
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
    assert server.process is not None and server.process.poll() is None


def test_folders_added_and_removed_are_picked_up_by_a_rescan(two_models: Path, tiny_model: Callable,
                                                             start: Callable) -> None:
    server = start(two_models, "--rescan-interval", "0")
    assert set(states(server)) == {"tiny-sd15", "tiny-sd21"}
    # without a budget both load at start-up; a model still loading is in use, which a rescan leaves in place
    until("both models loaded", lambda: {m["state"] for m in states(server).values()} == {"loaded"})
    (two_models / "tiny-sdxl").symlink_to(tiny_model("tiny-sdxl"))
    assert generate(server, "tiny-sdxl").status_code == 404  # not yet looked at
    (two_models / "tiny-sd21").unlink()
    rescan = httpx.post(server.url + "/v0/models/rescan", timeout=30)
    assert rescan.status_code == 200, rescan.text
    assert (rescan.json()["added"], rescan.json()["removed"]) == (["tiny-sdxl"], ["tiny-sd21"])
    answer = httpx.post(server.url + GEN, json={**BODY, "model": "tiny-sdxl", "size": "128x128"}, timeout=120)
    assert answer.status_code == 200, answer.text
    gone = generate(server, "tiny-sd21")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found", gone.text
    listed = {m["id"] for m in httpx.get(server.url + "/v1/models", timeout=10).json()["data"]}
    assert listed == {"tiny-sd15", "tiny-sdxl"}


def test_the_periodic_rescan_finds_a_new_folder(two_models: Path, tiny_model: Callable, start: Callable) -> None:
    server = start(two_models, "--rescan-interval", "0.2", "--max-loaded-models", "1")
    (two_models / "tiny-sdxl").symlink_to(tiny_model("tiny-sdxl"))
    until("the new folder is listed", lambda: "tiny-sdxl" in states(server))
    assert states(server)["tiny-sdxl"]["state"] == "available"


def test_the_periodic_rescan_leaves_a_failed_model_failed(two_models: Path, tiny_model: Callable,
                                                          start: Callable) -> None:
    """Read afresh on every periodic rescan, a model that failed came back as available (so offered, so
    ready, so tried again on every request); only an asked-for rescan or load tries it again."""
    server = start(two_models, "--max-loaded-bytes", "1000", "--rescan-interval", "0.2")
    assert generate(server, "tiny-sd15").status_code == 507
    (two_models / "tiny-sdxl").symlink_to(tiny_model("tiny-sdxl"))
    until("a periodic rescan ran after the failure", lambda: "tiny-sdxl" in states(server))
    assert states(server)["tiny-sd15"]["state"] == "failed"


def test_a1111_checkpoint_routes_load_unload_and_refresh(two_models: Path, tiny_model: Callable,
                                                         start: Callable) -> None:
    server = start(two_models, "--max-loaded-models", "1", "--rescan-interval", "0")
    sdapi = server.url + "/sdapi/v1"

    def loaded() -> set[str]:
        return {name for name, model in states(server).items() if model["state"] == "loaded"}

    switched = httpx.post(sdapi + "/options", json={"sd_model_checkpoint": "tiny-sd21"}, timeout=120)
    assert switched.status_code == 200, switched.text
    assert loaded() == {"tiny-sd21"}  # loaded before the answer, as A1111 does
    assert httpx.post(sdapi + "/unload-checkpoint", timeout=30).status_code == 200
    assert loaded() == set()
    assert httpx.post(sdapi + "/reload-checkpoint", timeout=120).status_code == 200
    assert loaded() == {"tiny-sd21"}  # the selected checkpoint
    (two_models / "tiny-sdxl").symlink_to(tiny_model("tiny-sdxl"))
    assert "tiny-sdxl" not in {m["model_name"] for m in httpx.get(sdapi + "/sd-models", timeout=10).json()}
    assert httpx.post(sdapi + "/refresh-checkpoints", timeout=30).status_code == 200
    assert "tiny-sdxl" in {m["model_name"] for m in httpx.get(sdapi + "/sd-models", timeout=10).json()}
    txt2img = httpx.post(sdapi + "/txt2img", json={"prompt": "p", "width": 128, "height": 128, "steps": 1,
                                                   "override_settings": {"sd_model_checkpoint": "tiny-sdxl"}},
                         timeout=120)
    assert txt2img.status_code == 200, txt2img.text
    assert loaded() == {"tiny-sdxl"}


def test_readiness_without_a_loaded_model(two_models: Path, start: Callable) -> None:
    """A server with a budget loads on demand: ready at once, with nothing loaded yet."""
    server = start(two_models, "--max-loaded-models", "1")
    ready = httpx.get(server.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and set(ready.json()["models"]) == {"tiny-sd15", "tiny-sd21"}, ready.text
    assert not [m for m in states(server).values() if m["state"] != "available"]
