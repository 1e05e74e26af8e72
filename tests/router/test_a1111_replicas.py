"""A1111's state with two front doors, as the Kubernetes base runs them (two routers sharing the images
volume, one node registered with both): options set through one are what the other reads and renders
with; a render running through one shows in the other's /progress and stops on the other's /interrupt.
The render is held inside the node's ONNX Runtime (tests/faults) while the other front door is asked."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults import environment
from tests.patience import until
from tests.processes import ServerProcess
from tests.router.fleet import ENV

KEY = "sk-a1111"
BASIC = {"Authorization": "Basic " + base64.b64encode(f"webui:{KEY}".encode()).decode()}
TXT2IMG = {"prompt": "a lighthouse", "steps": 3, "width": 64, "height": 64}


@pytest.fixture
def doors(tiny_model: Callable[[str], Path], tmp_path: Path, faults: Path) -> Iterator[list[ServerProcess]]:
    models = tiny_model("tiny-sd15").parent
    tiny_model("tiny-sd21")
    shared = tmp_path / "images"  # the volume both routers mount
    env = {**ENV, "SDSERVE_API_KEYS": KEY}
    routers = [ServerProcess("router", ["--images-dir", str(shared), "--default-model", "tiny-sd15"], tmp_path,
                             env=env, name=f"router-{i}") for i in range(2)]
    node = ServerProcess("node", ["--models-dir", str(models), "--model", "tiny-sd15", "--model", "tiny-sd21",
                                  "--heartbeat-interval", "1", "--threads", "1",
                                  *[arg for r in routers for arg in ("--router", r.url)]],
                         tmp_path, env={**env, **environment(faults)}, name="node")
    try:
        for process in (*routers, node):
            process.start(ready=False)
        for router in routers:
            router.wait(ready=True, timeout=120)
        yield routers
    finally:
        (faults / "pause").unlink(missing_ok=True)
        for process in (node, *routers):
            process.kill()


def test_options_set_on_one_front_door_hold_on_the_other(doors: list[ServerProcess]) -> None:
    one, other = doors
    until("both routers see both models", lambda: all(
        {"tiny-sd15", "tiny-sd21"} <= {m["model_name"] for m in httpx.get(
            r.url + "/sdapi/v1/sd-models", headers=BASIC, timeout=10).json()} for r in doors))
    assert httpx.get(other.url + "/sdapi/v1/options", headers=BASIC, timeout=10).json()["sd_model_checkpoint"] \
        == "tiny-sd15"
    chosen = {"sd_model_checkpoint": "tiny-sd21", "samples_format": "jpg"}
    assert httpx.post(one.url + "/sdapi/v1/options", json=chosen, headers=BASIC, timeout=10).status_code == 200
    options = httpx.get(other.url + "/sdapi/v1/options", headers=BASIC, timeout=10).json()
    assert {k: options[k] for k in chosen} == chosen
    answer = httpx.post(other.url + "/sdapi/v1/txt2img", json=TXT2IMG, headers=BASIC, timeout=120)
    assert answer.status_code == 200, answer.text
    assert '"sd_model_name": "tiny-sd21"' in answer.json()["info"]
    assert base64.b64decode(answer.json()["images"][0])[:3] == b"\xff\xd8\xff"  # samples_format jpg


def test_progress_and_interrupt_reach_a_render_on_the_other_front_door(doors: list[ServerProcess],
                                                                       faults: Path) -> None:
    one, other = doors
    assert httpx.get(other.url + "/sdapi/v1/progress", headers=BASIC, timeout=10).json()["progress"] == 0
    (faults / "pause").touch()
    answers: list[httpx.Response] = []
    render = threading.Thread(target=lambda: answers.append(
        httpx.post(one.url + "/sdapi/v1/txt2img", json=TXT2IMG, headers=BASIC, timeout=120)))
    render.start()
    until("the render is held inside the node's ONNX Runtime", (faults / "paused").exists)

    def progress() -> dict:
        return httpx.get(other.url + "/sdapi/v1/progress", headers=BASIC, timeout=10).json()
    until("the other front door reports the render", lambda: progress()["progress"] > 0)
    assert progress()["state"]["job"] == "scripts_txt2img" and progress()["state"]["sampling_steps"] == 3

    assert httpx.post(other.url + "/sdapi/v1/interrupt", headers=BASIC, timeout=10).status_code == 200
    render.join(60)  # answered while the node still holds the render: the interrupt reached front door one
    assert [a.status_code for a in answers] == [200] and (faults / "pause").exists()
    until("no render in progress any more", lambda: progress()["progress"] == 0)
