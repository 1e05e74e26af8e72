"""AUTOMATIC1111's API (/sdapi/v1): the requests real clients send, on a standalone server and on a router
with two nodes, checked against what the OpenAI routes render for the same settings."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.processes import ServerProcess
from tests.router.fleet import Fleet

KEY = "a1111-key"
MODEL = "tiny-sd15"
BASIC = ("open-webui", KEY)  # Open WebUI sends AUTOMATIC1111_API_AUTH "user:password" as HTTP Basic
BEARER = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def standalone(lora_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[ServerProcess]:
    """Over the LoRA-capable export, with one adapter, "style", for prompt tags."""
    from tests import adapters

    models = lora_model(MODEL).parent
    work = tmp_path_factory.mktemp("sdapi")
    (work / "lora").mkdir()
    adapters.make(work / "lora", "style", MODEL, ("unet", "text_encoder"), rank=4, alpha=4.0, seed=7)
    process = ServerProcess("standalone", ["--models-dir", str(models), "--model", MODEL, "--images-dir",
                                           str(work / "images"), "--lora-dir", str(work / "lora")], work,
                            env={"SDSERVE_API_KEYS": KEY}).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def router(tiny_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # A router renders requests that name no model only with --default-model (a standalone server defaults
    # to its first model); A1111 clients name none until they POST /options.
    fleet = Fleet(tiny_model(MODEL).parent, tmp_path_factory.mktemp("sdapi-fleet"), ["--default-model", MODEL])
    fleet.router.env["SDSERVE_API_KEYS"] = KEY
    for name in ("node-a", "node-b"):
        fleet.add_node(name, MODEL)
    fleet.start()
    yield fleet.router
    fleet.stop()


@pytest.fixture(params=["standalone", "router"])
def front(request: pytest.FixtureRequest) -> ServerProcess:
    return request.getfixturevalue(request.param)


def _decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def _same_images(a1111: list[str], openai: list[bytes]) -> bool:
    """The same pixels (A1111's PNGs also carry their `parameters` text, the OpenAI route's do not)."""
    ours = [np.asarray(_decode(image)) for image in a1111]
    theirs = [np.asarray(Image.open(io.BytesIO(data))) for data in openai]
    return len(ours) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


def _openai(url: str, path: str, **fields: object) -> list[bytes]:
    if path == "generations":
        response = httpx.post(f"{url}/v1/images/generations", json={**fields, "response_format": "b64_json"},
                              headers=BEARER, timeout=60)
    else:
        files = {name: ("f.png", fields.pop(name), "image/png") for name in ("image", "mask") if name in fields}
        data = {k: str(v) for k, v in {**fields, "response_format": "b64_json"}.items()}
        response = httpx.post(f"{url}/v1/images/edits", data=data, files=files, headers=BEARER, timeout=60)
    assert response.status_code == 200, response.text
    return [base64.b64decode(item["b64_json"]) for item in response.json()["data"]]


def test_open_webui_flow_renders_what_the_openai_route_renders(front: ServerProcess) -> None:
    """Open WebUI's automatic1111 engine: GET /options, GET /sd-models, POST the options back with the
    model's title, then txt2img with prompt, batch_size, width, height, steps and negative_prompt."""
    api = httpx.Client(base_url=f"{front.url}/sdapi/v1", auth=BASIC, timeout=60)
    options = api.get("/options").json()
    titles = [model["title"] for model in api.get("/sd-models").json()]
    assert titles == [MODEL] and options["sd_model_checkpoint"] == MODEL
    assert api.post("/options", json={**options, "sd_model_checkpoint": titles[0]}).status_code == 200
    body = {"prompt": "a lighthouse at dusk", "batch_size": 2, "width": 64, "height": 96, "steps": 3,
            "negative_prompt": "fog"}
    answer = api.post("/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    reply = answer.json()
    info = json.loads(reply["info"])
    assert [_decode(image).size for image in reply["images"]] == [(64, 96), (64, 96)]
    assert info["all_seeds"] == [info["seed"], info["seed"] + 1]
    assert reply["parameters"]["prompt"] == body["prompt"] and reply["parameters"]["steps"] == 3
    expected = _openai(front.url, "generations", prompt=body["prompt"], negative_prompt="fog", n=2, size="64x96",
                       steps=3, seed=info["seed"], guidance_scale=info["cfg_scale"], sampler="euler")
    assert _same_images(reply["images"], expected)


@pytest.mark.parametrize(("sampler", "scheduler", "ours"), [("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
                                                             ("DPM++ 2M Karras", None, "dpmpp_2m_karras"),
                                                             ("Euler a", "Automatic", "euler_a")])
def test_sampler_names_map_onto_ours(standalone: ServerProcess, sampler: str, scheduler: str | None,
                                     ours: str) -> None:
    body = {"prompt": "a red boat", "width": 64, "height": 64, "steps": 3, "cfg_scale": 4.5, "seed": 41,
            "sampler_name": sampler, "scheduler": scheduler, "override_settings": {"sd_model_checkpoint": MODEL}}
    reply = httpx.post(f"{standalone.url}/sdapi/v1/txt2img", json=body, headers=BEARER, timeout=60).json()
    expected = _openai(standalone.url, "generations", prompt="a red boat", size="64x64", steps=3, seed=41,
                       guidance_scale=4.5, sampler=ours)
    assert _same_images(reply["images"], expected)


def test_lora_prompt_tags_render_as_the_openai_lora_field(standalone: ServerProcess) -> None:
    url = f"{standalone.url}/sdapi/v1"
    assert [item["name"] for item in httpx.get(f"{url}/loras", auth=BASIC).json()] == ["style"]
    body = {"prompt": "a red boat <lora:style:0.8>", "width": 64, "height": 64, "steps": 3, "seed": 12}
    reply = httpx.post(f"{url}/txt2img", json=body, auth=BASIC, timeout=60).json()
    common = {"size": "64x64", "steps": 3, "seed": 12, "sampler": "euler", "guidance_scale": reply["parameters"]
              ["cfg_scale"]}
    with_lora = _openai(standalone.url, "generations", prompt="a red boat", lora=[{"name": "style", "scale": 0.8}],
                        **common)
    assert _same_images(reply["images"], with_lora)
    without = _openai(standalone.url, "generations", prompt="a red boat", **common)
    assert with_lora != without  # the tag did something
    assert json.loads(reply["info"])["comments"] == ""


def test_unknown_lora_tags_render_without_them_and_say_so(standalone: ServerProcess) -> None:
    """As A1111 does: "Lora not found: nope" in `info`, the image as if the tag were not there. The OpenAI
    routes keep their 400."""
    url = f"{standalone.url}/sdapi/v1"
    body = {"prompt": "a red boat <lora:nope:1> <lora:style:0.8>", "width": 64, "height": 64, "steps": 3, "seed": 12}
    reply = httpx.post(f"{url}/txt2img", json=body, auth=BASIC, timeout=60)
    assert reply.status_code == 200, reply.text
    info = json.loads(reply.json()["info"])
    assert info["comments"] == "Lora not found: nope\n" and info["prompt"] == "a red boat"
    common = {"size": "64x64", "steps": 3, "seed": 12, "sampler": "euler", "guidance_scale": info["cfg_scale"]}
    expected = _openai(standalone.url, "generations", prompt="a red boat", lora=[{"name": "style", "scale": 0.8}],
                       **common)
    assert _same_images(reply.json()["images"], expected)  # with style, without nope
    openai = httpx.post(f"{standalone.url}/v1/images/generations", headers=BEARER, timeout=60,
                        json={"prompt": "a red boat <lora:nope:1>", **common})
    assert openai.status_code == 400 and openai.json()["error"]["code"] == "lora_not_found"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("invert", [0, 1])
def test_img2img_mask_is_the_openai_edit_with_the_inverted_mask(standalone: ServerProcess, invert: int) -> None:
    """A1111: white = repaint; OpenAI: transparent = edit. The same area renders the same pixels."""
    rng = np.random.default_rng(3)
    picture = _png(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    repaint = np.zeros((64, 64), dtype=bool)
    repaint[16:48, 8:40] = True
    white = repaint if not invert else ~repaint  # with inpainting_mask_invert, black marks the repaint area
    a1111_mask = _png(Image.fromarray(np.where(white, 255, 0).astype(np.uint8), mode="L"))
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(repaint, 0, 255)
    openai_mask = _png(Image.fromarray(rgba, mode="RGBA"))
    body = {"prompt": "a window", "init_images": ["data:image/png;base64," + base64.b64encode(picture).decode()],
            "mask": base64.b64encode(a1111_mask).decode(), "inpainting_mask_invert": invert,
            "denoising_strength": 0.8, "width": 64, "height": 64, "steps": 4, "cfg_scale": 6, "seed": 9,
            "sampler_name": "Euler", "mask_blur": 4, "inpainting_fill": 1, "inpaint_full_res": False}
    answer = httpx.post(f"{standalone.url}/sdapi/v1/img2img", json=body, auth=BASIC, timeout=60)
    assert answer.status_code == 200, answer.text
    expected = _openai(standalone.url, "edits", image=picture, mask=openai_mask, prompt="a window", size="64x64",
                       strength=0.8, steps=4, guidance_scale=6, seed=9, sampler="euler")
    assert _same_images(answer.json()["images"], expected)
    assert answer.json()["parameters"]["init_images"] is None  # include_init_images is false


def _interrupted_render(api: httpx.Client, stop: str = "/interrupt") -> tuple[dict, httpx.Response]:
    """A 150-step txt2img with a preview per step: /progress once it shows an estimate, then the reply to
    `stop` (the latest estimate of the image)."""
    assert api.post("/options", json={"show_progress_every_n_steps": 0}).status_code == 200  # a preview per step
    outcome: dict[str, httpx.Response] = {}
    body = {"prompt": "a long render", "width": 128, "height": 128, "steps": 150, "seed": 5}
    worker = threading.Thread(target=lambda: outcome.update(reply=api.post("/txt2img", json=body)))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            progress = api.get("/progress").json()
            if progress["current_image"]:
                break
            time.sleep(0.02)
        assert api.get("/progress", params={"skip_current_image": "true"}).json()["current_image"] is None
        assert api.post(stop).status_code == 200
        worker.join(60)
    finally:
        api.post("/options", json={"show_progress_every_n_steps": 10})
    return progress, outcome["reply"]


def _blocks(image: Image.Image) -> bool:
    """Whether every 8×8 block is one colour: the linear latent map draws each latent cell as its block."""
    pixels = np.asarray(image.convert("RGB")).reshape(image.height // 8, 8, image.width // 8, 8, 3)
    return bool((pixels == pixels[:, :1, :, :1]).all())


def test_progress_shows_the_estimate_and_interrupt_ends_the_render(front: ServerProcess) -> None:
    """By default (A1111's "Approx NN": the tiny decoder where the model has one) the estimates are cheap: on
    tiny-sd15, which has none, the linear map, whatever --preview says."""
    api = httpx.Client(base_url=f"{front.url}/sdapi/v1", auth=BASIC, timeout=120)
    assert api.get("/progress").json()["progress"] == 0  # nothing running
    assert api.get("/options").json()["show_progress_type"] == "Approx NN"  # tiny-sd15 has no tiny decoder
    progress, reply = _interrupted_render(api)
    assert 0 < progress["progress"] <= 1 and progress["state"]["sampling_steps"] == 150
    assert _decode(progress["current_image"]).size == (128, 128) and _blocks(_decode(progress["current_image"]))
    assert reply.status_code == 200, reply.text
    assert json.loads(reply.json()["info"])["interrupted"] is True
    assert [_decode(image).size for image in reply.json()["images"]] == [(128, 128)]
    assert _blocks(_decode(reply.json()["images"][0]))
    assert api.get("/progress").json()["progress"] == 0


def test_skip_ends_the_render_as_interrupt_does(standalone: ServerProcess) -> None:
    """A request's images render together, so A1111's "skip to the next batch" has only the end to go to."""
    api = httpx.Client(base_url=f"{standalone.url}/sdapi/v1", auth=BASIC, timeout=120)
    assert api.post("/skip").json() is None  # A1111's answer; idle, nothing to stop
    _, reply = _interrupted_render(api, "/skip")
    assert reply.status_code == 200, reply.text
    assert json.loads(reply.json()["info"])["interrupted"] is True and len(reply.json()["images"]) == 1
    assert api.get("/progress").json()["progress"] == 0


def test_full_previews_when_the_client_asks(standalone: ServerProcess) -> None:
    """show_progress_type "Full": each estimate is the VAE's decode, not blocks of one colour."""
    api = httpx.Client(base_url=f"{standalone.url}/sdapi/v1", auth=BASIC, timeout=120)
    assert api.post("/options", json={"show_progress_type": "Full"}).status_code == 200
    try:
        progress, reply = _interrupted_render(api)
    finally:
        api.post("/options", json={"show_progress_type": "Approx NN"})
    assert reply.status_code == 200, reply.text
    assert not _blocks(_decode(progress["current_image"])) and not _blocks(_decode(reply.json()["images"][0]))


@pytest.mark.parametrize(("path", "body", "loc"), [
    ("txt2img", {"prompt": "x", "steps": "many"}, ["body", "steps"]),
    ("txt2img", {"prompt": "x", "width": 65}, ["body", "width"]),
    ("txt2img", {"prompt": "x", "sampler_name": "Heun"}, ["body", "sampler_name"]),
    ("txt2img", {"prompt": "x", "sampler_name": "Euler", "scheduler": "Karras"}, ["body", "scheduler"]),
    ("txt2img", {"prompt": "x", "seed": -7}, ["body", "seed"]),
    ("txt2img", {"prompt": "x", "batch_size": 6, "n_iter": 2}, ["body", "batch_size"]),
    ("txt2img", {"prompt": "x", "enable_hr": True}, ["body", "enable_hr"]),
    ("txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}},
     ["body", "override_settings", "sd_model_checkpoint"]),
    ("img2img", {"prompt": "x"}, ["body", "init_images"]),
    ("img2img", {"prompt": "x", "init_images": ["bm90IGFuIGltYWdl"]}, ["body", "init_images"]),
    ("img2img", {"prompt": "x", "init_images": ["x"], "denoising_strength": 0}, ["body", "denoising_strength"]),
    ("options", {"sd_model_checkpoint": "nope"}, ["body", "sd_model_checkpoint"]),
    ("options", {"show_progress_every_n_steps": "often"}, ["body", "show_progress_every_n_steps"]),
    ("options", {"notes": "x" * 70_000}, ["body", "notes"]),  # options live in memory: bounded
    ("options", {f"option_{i}": i for i in range(1100)}, ["body"]),
])
def test_bad_fields_are_422_naming_them(standalone: ServerProcess, path: str, body: dict, loc: list[str]) -> None:
    answer = httpx.post(f"{standalone.url}/sdapi/v1/{path}", json=body, auth=BASIC, timeout=30)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"] == loc


def test_keys_as_basic_or_bearer_and_lists(standalone: ServerProcess) -> None:
    url = f"{standalone.url}/sdapi/v1"
    wrong = httpx.get(f"{url}/options", auth=("open-webui", "wrong"))
    assert wrong.status_code == 401 and wrong.json()["detail"] and wrong.headers["www-authenticate"] == "Basic"
    assert httpx.get(f"{url}/options").status_code == 401
    assert httpx.get(f"{url}/options", headers=BEARER).status_code == 200
    assert httpx.get(f"{url}/options", auth=(KEY, "")).status_code == 200
    samplers = [item["name"] for item in httpx.get(f"{url}/samplers", auth=BASIC).json()]
    assert {"Euler", "Euler a", "DDIM", "DPM++ 2M", "LCM"} <= set(samplers)
    assert [item["label"] for item in httpx.get(f"{url}/schedulers", auth=BASIC).json()] == ["Automatic", "Karras"]
    assert httpx.post(f"{url}/txt2img", content=b"{not json", auth=BASIC).status_code == 422
