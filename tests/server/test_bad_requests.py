"""Bad input gets the documented status and an OpenAI error body naming the field; the server keeps serving."""

from __future__ import annotations

import base64
import io
import zlib
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.processes import ServerProcess

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
VARY = "/v1/images/variations"
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error"}


def png(size: tuple[int, int] = (64, 64), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="GIF")
    return buffer.getvalue()


def bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width × height pixels in a few kilobytes."""
    row = b"\x00" + b"\x00" * (width // 8)
    raw = zlib.compress(row * height, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def json_case(body: dict[str, Any], status: int, param: str | None, code: str | None = None) -> tuple:
    return ("POST", GEN, {"json": {"steps": 1, "size": "64x64"} | body}, status, param, code or f"invalid_{param}")


def edit_case(fields: dict[str, str], files: dict[str, tuple] | list, status: int, param: str | None,
              code: str | None = None, path: str = EDIT) -> tuple:
    return ("POST", path, {"data": fields, "files": files}, status, param, code or f"invalid_{param}")


IMAGE = ("image", ("a.png", png(), "image/png"))
CASES = [
    json_case({"prompt": None}, 400, "prompt"),
    ("POST", GEN, {"json": {"size": "64x64"}}, 400, "prompt", "missing_required_parameter"),
    json_case({"prompt": ""}, 400, "prompt"),
    json_case({"prompt": "   \n\t "}, 400, "prompt"),
    json_case({"prompt": "x" * 4001}, 400, "prompt"),
    json_case({"prompt": 123}, 400, "prompt"),
    json_case({"prompt": "a", "n": 0}, 400, "n"),
    json_case({"prompt": "a", "n": 11}, 400, "n"),
    json_case({"prompt": "a", "n": "2"}, 400, "n"),
    json_case({"prompt": "a", "n": 1.5}, 400, "n"),
    json_case({"prompt": "a", "size": "100x100"}, 400, "size"),
    json_case({"prompt": "a", "size": "1024x1024"}, 400, "size"),
    json_case({"prompt": "a", "size": "big"}, 400, "size"),
    json_case({"prompt": "a", "size": "64x"}, 400, "size"),
    json_case({"prompt": "a", "size": 64}, 400, "size"),
    json_case({"prompt": "a", "quality": "ultra"}, 400, "quality"),
    json_case({"prompt": "a", "style": "sepia"}, 400, "style"),
    json_case({"prompt": "a", "response_format": "gif"}, 400, "response_format"),
    json_case({"prompt": "a", "output_format": "bmp"}, 400, "output_format"),
    json_case({"prompt": "a", "output_compression": 101}, 400, "output_compression"),
    json_case({"prompt": "a", "seed": -1}, 400, "seed"),
    json_case({"prompt": "a", "seed": "lucky"}, 400, "seed"),
    json_case({"prompt": "a", "seed": 2**53}, 400, "seed"),  # beyond what JavaScript clients read exactly
    json_case({"prompt": "a", "seed": 2**53 - 1, "n": 2}, 400, "seed"),  # the second image's seed would be
    json_case({"prompt": "a", "seed": 2**53 - 1, "n": 2, "stream": True}, 400, "seed"),  # before the stream
    json_case({"prompt": "a", "steps": 0}, 400, "steps"),
    json_case({"prompt": "a", "steps": 151}, 400, "steps"),
    json_case({"prompt": "a", "guidance_scale": 31}, 400, "guidance_scale"),
    json_case({"prompt": "a", "guidance_scale": "high"}, 400, "guidance_scale"),
    json_case({"prompt": "a", "sampler": "heun"}, 400, "sampler"),
    json_case({"prompt": "a", "strength": 1.5}, 400, "strength"),
    json_case({"prompt": "a", "negative_prompt": 5}, 400, "negative_prompt"),
    json_case({"prompt": "a", "user": 5}, 400, "user"),
    json_case({"prompt": "a", "sampler": "lcm", "steps": 80}, 400, "steps"),  # rejected by the engine
    json_case({"prompt": "a", "model": "no-such-model"}, 404, "model", "model_not_found"),
    ("POST", GEN, {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None,
     "invalid_body"),
    ("POST", GEN, {"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, 400, None,
     "invalid_request"),
    ("POST", GEN, {"content": b'{"prompt": "a"}', "headers": {"content-type": "text/plain"}}, 415, None,
     "unsupported_media_type"),
    ("POST", GEN, {"data": {"prompt": "a"}}, 415, None, "unsupported_media_type"),
    ("POST", "/v1/images/nothing", {"json": {"prompt": "a"}}, 404, None, "not_found"),
    ("GET", GEN, {}, 405, None, "method_not_allowed"),
    ("GET", "/v1/images/files/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.png", {}, 404, "name", "image_not_found"),
    edit_case({"prompt": "a"}, {}, 415, None, "unsupported_media_type"),  # no file part: not multipart at all
    edit_case({"prompt": "a"}, {"mask": ("m.png", png(mode="RGBA"), "image/png")}, 400, "image",
              "missing_required_parameter"),
    edit_case({"prompt": "a", "image": "not-a-file"}, {"mask": ("m.png", png(mode="RGBA"), "image/png")}, 400,
              "image"),
    edit_case({"prompt": "a"}, {"image": ("a.png", b"hello, I am text", "image/png")}, 400, "image",
              "invalid_image_format"),
    edit_case({"prompt": "a"}, {"image": ("a.png", png()[:60], "image/png")}, 400, "image", "invalid_image_format"),
    edit_case({"prompt": "a"}, {"image": ("a.gif", gif(), "image/gif")}, 400, "image", "invalid_image_format"),
    edit_case({"prompt": "a"}, {"image": ("a.png", bomb(20000, 20000), "image/png")}, 400, "image", "image_too_large"),
    # 20 megapixels: Pillow's own bomb check (89 MP) lets it through; our 16 MP limit must not.
    edit_case({"prompt": "a"}, {"image": ("a.png", bomb(5000, 4000), "image/png")}, 400, "image", "image_too_large"),
    edit_case({"prompt": "a"}, {"image": ("a.png", b"\x89PNG" + b"\0" * (26 * 1024 * 1024), "image/png")}, 413,
              "image", "file_too_large"),
    edit_case({"prompt": "a"}, dict([IMAGE, ("mask", ("m.png", png((32, 64), "RGBA"), "image/png"))]), 400, "mask"),
    edit_case({"prompt": "a"}, dict([IMAGE, ("mask", ("m.png", png((64, 64), "RGB"), "image/png"))]), 400, "mask"),
    edit_case({"prompt": "a"}, dict([IMAGE, ("mask", ("m.png", b"garbage", "image/png"))]), 400, "mask",
              "invalid_image_format"),
    edit_case({}, dict([IMAGE]), 400, "prompt", "missing_required_parameter"),
    edit_case({"prompt": "a", "n": "three"}, dict([IMAGE]), 400, "n"),
    edit_case({"prompt": "a", "size": "65x65"}, dict([IMAGE]), 400, "size"),
    edit_case({"prompt": "a", "strength": "-0.5"}, dict([IMAGE]), 400, "strength"),
    edit_case({"prompt": "a", "strength": "1e-300"}, dict([IMAGE]), 400, "strength"),  # too low to run one step
    edit_case({"prompt": "a", "strength": "0"}, dict([IMAGE]), 400, "strength"),
    json_case({"prompt": "a", "strength": 0}, 400, "strength"),
    ("POST", EDIT, {"json": {"prompt": "a"}}, 400, "images", "missing_required_parameter"),  # JSON edits need images
    ("POST", EDIT, {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None,
     "invalid_body"),
    ("POST", EDIT, {"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, 400, None,
     "invalid_request"),
    edit_case({}, {"image": ("a.txt", b"plain text", "text/plain")}, 400, "image", "invalid_image_format", VARY),
    edit_case({"n": "1"}, {"mask": ("m.png", png(), "image/png")}, 400, "image", "missing_required_parameter", VARY),
    edit_case({"model": "dall-e-9000"}, dict([IMAGE]), 404, "model", "model_not_found", VARY),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "param", "code"), CASES,
                         ids=[f"{i}-{c[1].rsplit('/', 1)[-1]}-{c[3]}" for i, c in enumerate(CASES)])
def test_bad_request(server: ServerProcess, method: str, path: str, kwargs: dict, status: int,
                     param: str | None, code: str) -> None:
    response = httpx.request(method, server.url + path, timeout=60, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == TYPES[status]
    assert error["param"] == param, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] == code, error


def test_whole_body_over_the_limit_is_413(server: ServerProcess) -> None:
    files = {"image": ("a.png", b"\0" * (30 * 1024 * 1024), "image/png"),
             "mask": ("m.png", b"\0" * (30 * 1024 * 1024), "image/png")}
    response = httpx.post(server.url + EDIT, data={"prompt": "a"}, files=files, timeout=60)
    assert response.status_code == 413
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_still_serving_after_the_bad_requests(server: ServerProcess) -> None:
    assert len(CASES) >= 30
    response = httpx.post(server.url + GEN, json={"prompt": "still here", "size": "64x64", "steps": 1}, timeout=60)
    assert response.status_code == 200
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert server.alive()


GARBAGE = b"hello, I am text"
GARBAGE_URL = "data:image/png;base64," + base64.b64encode(GARBAGE).decode()
PNG_URL = "data:image/png;base64," + base64.b64encode(png()).decode()
UNDECODABLE = {  # every way an image reaches the server: (path, request arguments, the field named)
    "edits image": (EDIT, {"data": {"prompt": "a"}, "files": {"image": ("a.png", GARBAGE, "image/png")}}, "image"),
    "edits mask": (EDIT, {"data": {"prompt": "a"}, "files": dict([IMAGE, ("mask", ("m.png", GARBAGE, "image/png"))])},
                   "mask"),
    "JSON edits images": (EDIT, {"json": {"prompt": "a", "images": [{"image_url": GARBAGE_URL}]}}, "images"),
    "JSON edits mask": (EDIT, {"json": {"prompt": "a", "images": [{"image_url": PNG_URL}],
                                        "mask": {"image_url": GARBAGE_URL}}}, "mask"),
    "variations image": (VARY, {"files": {"image": ("a.png", GARBAGE, "image/png")}}, "image"),
    "img2img init_images": ("/sdapi/v1/img2img", {"json": {"prompt": "a", "init_images": [GARBAGE_URL]}},
                            "init_images"),
    "img2img mask": ("/sdapi/v1/img2img", {"json": {"prompt": "a", "init_images": [PNG_URL], "mask": GARBAGE_URL}},
                     "mask"),
}


@pytest.mark.parametrize("case", UNDECODABLE)
def test_an_undecodable_image_is_named_with_the_accepted_formats(server: ServerProcess, case: str) -> None:
    """The message names the field and the formats, and nothing of the server's insides (PIL's own message
    holds the repr of the buffer it read, `<_io.BytesIO object at 0x…>`)."""
    path, kwargs, param = UNDECODABLE[case]
    response = httpx.post(server.url + path, timeout=60, **kwargs)
    if path.startswith("/sdapi"):  # A1111's (FastAPI's) shape
        assert response.status_code == 422, response.text
        detail = response.json()["detail"][0]
        assert detail["loc"] == ["body", param]
        message = detail["msg"]
    else:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (param, "invalid_image_format")
        message = error["message"]
    assert f"'{param}'" in message and "PNG, JPEG or WebP" in message, message
    assert "0x" not in message and "<" not in message, message
