"""What scripts call around A1111's renders: the routes they read at start-up (through the real `webuiapi`
package), /png-info on the PNGs the server returns, the error shapes of unknown routes, and the scripts a
request may name. (/skip: `test_sdapi.py`, beside /interrupt.)"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from tests.processes import ServerProcess

KEY = "scripts-key"
MODEL = "tiny-sd15"
BASIC = ("webui", KEY)


@pytest.fixture(scope="module")
def server(tiny_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("sdapi-scripts")
    process = ServerProcess("standalone", ["--models-dir", str(tiny_model(MODEL).parent), "--model", MODEL,
                                           "--images-dir", str(work / "images")], work,
                            env={"SDSERVE_API_KEYS": KEY}).start(timeout=300)  # on a busy machine too
    yield process
    process.stop()


@pytest.fixture
def api(server: ServerProcess) -> webuiapi.WebUIApi:
    """As scripts make it: with a user name and password it reads /scripts at once (its extension check)."""
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", steps=2, username=BASIC[0],
                             password=BASIC[1])


@pytest.mark.parametrize(("method", "path", "status", "body"), [
    ("GET", "/sdapi/v1/no-such-route", 404, {"detail": "Not Found"}),
    ("POST", "/sdapi/v1/no-such-route", 404, {"detail": "Not Found"}),
    ("GET", "/controlnet/no-such-route", 404, {"detail": "Not Found"}),
    ("GET", "/sdapi/v1/skip", 405, {"detail": "Method Not Allowed"}),
    ("GET", "/sdapi/v1/png-info", 405, {"detail": "Method Not Allowed"}),
])
def test_unknown_routes_answer_as_fastapi(server: ServerProcess, method: str, path: str, status: int,
                                          body: dict) -> None:
    """webuiapi hands whatever JSON comes back to its caller: an OpenAI error body looked like data."""
    answer = httpx.request(method, server.url + path, auth=BASIC, timeout=10)
    assert (answer.status_code, answer.json()) == (status, body)


def test_other_errors_keep_their_shapes(server: ServerProcess) -> None:
    openai = httpx.get(server.url + "/v1/no-such-route", timeout=10)
    assert openai.status_code == 404 and openai.json()["error"]["code"] == "not_found"
    unauthorized = httpx.get(server.url + "/sdapi/v1/scripts", timeout=10)
    assert unauthorized.status_code == 401 and isinstance(unauthorized.json()["detail"], str)
    invalid = httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": "many"}, auth=BASIC)
    assert invalid.status_code == 422 and invalid.json()["detail"][0]["loc"] == ["body", "steps"]


def _resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_start_up_routes_through_webuiapi(server: ServerProcess, api: webuiapi.WebUIApi) -> None:
    assert not api.has_controlnet  # /scripts answered; webuiapi looks for the "controlnet m2m" script, not here
    assert api.get_scripts() == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_realesrgan_models() == []
    flags = api.get_cmd_flags()
    assert flags["api"] is True and flags["port"] == server.port and flags["ckpt_dir"] == server.args[1]
    ram = api.get_memory()["ram"]
    resident = _resident_bytes(server.process.pid)
    assert resident / 2 < ram["used"] < resident * 2 and ram["free"] == ram["total"] - ram["used"]
    assert "error" in api.get_memory()["cuda"]
    assert api.skip() is None  # A1111 answers null; nothing runs


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("prompt", ["a lighthouse, at dusk", "ein Leuchtturm ☃"])  # tEXt, and iTXt for UTF-8
def test_png_info_reads_what_our_pngs_carry(api: webuiapi.WebUIApi, prompt: str) -> None:
    result = api.txt2img(prompt=prompt, negative_prompt="fog", width=64, height=96, steps=2, seed=21,
                         cfg_scale=5.5, batch_size=2)
    assert [image.info["parameters"] for image in result.images] == result.info["infotexts"]
    second = api.png_info(result.images[1])  # webuiapi sends it back as a data URL, its text chunks kept
    assert second.info == result.info["infotexts"][1]
    parameters = second.json["parameters"]
    assert (parameters["Prompt"], parameters["Negative prompt"]) == (prompt, "fog")
    assert (parameters["Seed"], parameters["Steps"], parameters["CFG scale"]) == ("22", "2", "5.5")
    assert (parameters["Size-1"], parameters["Size-2"], parameters["Sampler"]) == ("64", "96", "Euler")


def test_png_info_without_parameters_and_of_a_non_image(server: ServerProcess, api: webuiapi.WebUIApi) -> None:
    plain = api.png_info(Image.fromarray(np.full((8, 8, 3), 200, np.uint8)))
    assert (plain.info, plain.json["parameters"]) == ("", {})
    for image in ("bm90IGFuIGltYWdl", ""):
        answer = httpx.post(server.url + "/sdapi/v1/png-info", json={"image": image}, auth=BASIC, timeout=10)
        assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "image"]


@pytest.mark.parametrize(("extra", "loc"), [
    ({"script_name": "x/y/z plot"}, ["body", "script_name"]),
    ({"alwayson_scripts": {"ADetailer": {"args": [True]}}}, ["body", "alwayson_scripts", "ADetailer"]),
    ({"alwayson_scripts": {"ControlNet": {"args": [{"module": "canny", "model": "x"}]}}},
     ["body", "alwayson_scripts", "ControlNet", "args", 0, "model"]),
    ({"alwayson_scripts": {"ControlNet": {"args": [True]}}}, ["body", "alwayson_scripts", "ControlNet", "args"]),
])
def test_scripts_this_server_does_not_run_are_422(server: ServerProcess, extra: dict, loc: list[str]) -> None:
    """As A1111 refuses a script it does not have; a ControlNet unit on a model without ControlNet inputs names
    its model."""
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 1, **extra}
    answer = httpx.post(server.url + "/sdapi/v1/txt2img", json=body, auth=BASIC, timeout=30)
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == loc


def test_disabled_controlnet_units_render_as_none(server: ServerProcess) -> None:
    """What webuiapi sends once it believes ControlNet is there: `{"args": []}`, or units switched off."""
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 1, "seed": 3}
    plain = httpx.post(server.url + "/sdapi/v1/txt2img", json=body, auth=BASIC, timeout=30)
    for scripts in ({"ControlNet": {"args": []}}, {"controlnet": {"args": [{"enabled": False, "module": "x"}]}}):
        answer = httpx.post(server.url + "/sdapi/v1/txt2img", json={**body, "alwayson_scripts": scripts},
                            auth=BASIC, timeout=30)
        assert answer.status_code == 200, answer.text
        assert base64.b64decode(answer.json()["images"][0]) == base64.b64decode(plain.json()["images"][0])
