"""A sick node leaves rotation: a render wedged inside ONNX Runtime (paused there by tests/faults, for as long
as the test keeps a file), or renders failing in the engine (ONNX Runtime raising, as on a lost GPU). The
node says so in its own /readyz (503) and in its reports, its router stops sending it work, /healthz fails
once it has been sick for --liveness-seconds, and all of it clears when the render steps again or, after a
failure streak, when a trial render succeeds. Every wait polls for a state with a generous deadline."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults import environment
from tests.patience import until
from tests.router.fleet import GEN, Fleet

BODY = {"model": "tiny-sd15", "prompt": "a wedge", "size": "64x64", "steps": 3, "response_format": "b64_json"}


def fleet_of_one(tiny_sd15: Path, work: Path, faults: Path, node_args: list[str]) -> Fleet:
    """A router and one node whose ONNX Runtime pauses or fails where `faults` says."""
    fleet = Fleet(tiny_sd15, work, ["--probe-timeout", "2"], node_args=["--heartbeat-interval", "1", "--threads", "1"])
    fleet.add_node("patient", "tiny-sd15", extra=node_args).env |= environment(faults)
    return fleet.start()


@pytest.fixture
def wedge_fleet(tiny_sd15: Path, tmp_path: Path, faults: Path) -> Iterator[Fleet]:
    fleet = fleet_of_one(tiny_sd15, tmp_path, faults, ["--stall-seconds", "1", "--liveness-seconds", "3"])
    yield fleet
    (faults / "pause").unlink(missing_ok=True)  # before the processes stop: no render stays held
    fleet.stop()


def status(url: str) -> httpx.Response:
    return httpx.get(url, timeout=10)


def test_a_render_wedged_in_the_backend_takes_the_node_out_until_it_steps(wedge_fleet: Fleet, faults: Path) -> None:
    fleet, node = wedge_fleet, wedge_fleet.nodes["patient"]
    assert httpx.post(fleet.router.url + GEN, json=BODY, timeout=60).status_code == 200  # its step times
    (faults / "pause").touch()
    answers: list[httpx.Response] = []
    wedged = threading.Thread(target=lambda: answers.append(httpx.post(fleet.router.url + GEN, json=BODY,
                                                                       timeout=120)))
    wedged.start()
    until("the render is paused inside ONNX Runtime", (faults / "paused").exists)

    until("the node's /readyz is 503", lambda: status(node.url + "/readyz").status_code == 503)
    ready = status(node.url + "/readyz").json()["error"]["message"]
    assert "has not stepped for" in ready, ready
    until("the router sees it sick", lambda: fleet.views()["patient"]["state"] == "sick")
    assert "has not stepped" in fleet.views()["patient"]["last_error"]
    refused = httpx.post(fleet.router.url + GEN, json=BODY, timeout=60)  # no node in rotation: not sent to it
    assert refused.status_code == 503 and "no healthy node" in refused.json()["error"]["message"], refused.text
    assert status(fleet.router.url + "/readyz").status_code == 503
    until("the node's /healthz fails (sick past --liveness-seconds)",
          lambda: status(node.url + "/healthz").status_code == 503)
    assert "not live" in status(node.url + "/healthz").json()["error"]["message"]

    (faults / "pause").unlink()
    wedged.join(120)
    assert [a.status_code for a in answers] == [200]
    until("the node is well again", lambda: status(node.url + "/readyz").status_code == 200
          and status(node.url + "/healthz").status_code == 200)
    until("back in the router's rotation", lambda: fleet.views()["patient"]["state"] == "healthy")
    assert httpx.post(fleet.router.url + GEN, json=BODY, timeout=60).status_code == 200


@pytest.fixture
def failing_fleet(tiny_sd15: Path, tmp_path: Path, faults: Path) -> Iterator[Fleet]:
    # the trial comes --stall-seconds after the last failure: long enough to be seen on any machine
    fleet = fleet_of_one(tiny_sd15, tmp_path, faults, ["--unhealthy-after-failures", "2", "--stall-seconds", "10"])
    yield fleet
    fleet.stop()


def test_renders_failing_in_the_engine_take_the_node_out_until_a_trial_succeeds(failing_fleet: Fleet,
                                                                                  faults: Path) -> None:
    fleet, node = failing_fleet, failing_fleet.nodes["patient"]
    (faults / "fail").touch()
    for _ in range(2):
        failed = httpx.post(fleet.router.url + GEN, json=BODY, timeout=60)
        assert failed.status_code == 500, failed.text
    assert status(node.url + "/readyz").status_code == 503
    assert "the last 2 renders failed" in status(node.url + "/readyz").json()["error"]["message"]
    until("the router sees it sick", lambda: fleet.views()["patient"]["state"] == "sick")
    assert status(node.url + "/healthz").status_code == 200  # not for --liveness-seconds (600) yet

    (faults / "fail").unlink()  # the "GPU" works again: the trial after --stall-seconds succeeds
    until("on trial: back in the router's rotation", lambda: fleet.views()["patient"]["state"] == "healthy")
    assert httpx.post(fleet.router.url + GEN, json=BODY, timeout=60).status_code == 200
    assert status(node.url + "/readyz").status_code == 200
