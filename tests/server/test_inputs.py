"""Inputs that must not exhaust or break a server: long prompts, big JSON, odd image files, uploads cut off or
sent as plain fields, paths that forge log lines, a full queue before any decoding."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import tracemalloc
from pathlib import Path

import httpx
import numpy as np
import pytest
from litestar.datastructures import UploadFile
from PIL import Image

from server import images
from server.errors import ApiError
from server.openai.routes import JSON_BODY_LIMIT
from server.openai.uploads import upload
from tests.patience import until
from tests.processes import ServerProcess
from tests.server.test_operations import metric, wait_until_idle

GEN = "/v1/images/generations"
VARY = "/v1/images/variations"
EDIT = "/v1/images/edits"
SMALL = {"size": "64x64", "steps": 1, "seed": 5, "response_format": "b64_json"}


def encoded(image: Image.Image, kind: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **options)
    return buffer.getvalue()


def vary(server: ServerProcess, data: bytes, **fields: str) -> httpx.Response:
    form = {"size": "64x64", "steps": "1", "seed": "5", "response_format": "b64_json"} | fields
    return httpx.post(server.url + VARY, data=form, files={"image": ("in", data, "application/octet-stream")},
                      timeout=120)


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "a", "negative_prompt": "x" * 4001}, "negative_prompt"),
    ({"prompt": "😀" * 3000}, "prompt"),  # under 4000 characters, far over the token windows
    ({"prompt": "a", "negative_prompt": "quiet river " * 330}, "negative_prompt"),
])
def test_prompts_are_bounded_before_the_queue(server: ServerProcess, body: dict, param: str) -> None:
    before = metric(server, "sdserve_render_seconds_count")
    response = httpx.post(server.url + GEN, json=SMALL | body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert response.json()["error"]["code"] == f"invalid_{param}"
    assert metric(server, "sdserve_render_seconds_count") == before  # nothing rendered


def test_json_bodies_have_a_small_limit(server: ServerProcess) -> None:
    response = httpx.post(server.url + GEN, json=SMALL | {"prompt": "a", "user": "u" * JSON_BODY_LIMIT}, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_strength_zero_is_refused_by_the_api(server: ServerProcess) -> None:
    response = httpx.post(server.url + GEN, json=SMALL | {"prompt": "a", "strength": 0}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "strength"


def test_phone_and_print_images_decode(server: ServerProcess) -> None:
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    mpo = encoded(rgb, "MPO", save_all=True, append_images=[Image.new("RGB", (64, 48))])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    cmyk = encoded(rgb.convert("CMYK"), "JPEG")
    for data in (mpo, cmyk):
        response = vary(server, data)
        assert response.status_code == 200, response.text
    # A 16-bit grayscale PNG renders exactly as its 8-bit reduction (PIL alone would clip it to white).
    wide = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    sixteen = encoded(Image.fromarray(wide), "PNG")
    eight = encoded(Image.fromarray((wide >> 8).astype(np.uint8), mode="L"), "PNG")
    first, second = vary(server, sixteen), vary(server, eight)
    assert first.status_code == 200, first.text
    assert first.json()["data"][0]["b64_json"] == second.json()["data"][0]["b64_json"]


def test_masks_are_computed_lean() -> None:
    """The alpha mask of a 16-megapixel image costs no numpy copies (the old one: RGBA array + int64)."""
    picture = Image.new("RGBA", (4000, 4000), (10, 20, 30, 255))
    picture.paste((0, 0, 0, 0), (0, 0, 100, 100))
    tracemalloc.start()
    try:
        mask = images.edit_mask(picture)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert mask is not None and mask.getpixel((5, 5)) == 255 and mask.getpixel((200, 200)) == 0
    assert peak < 8 * 1024 * 1024, peak


def test_upload_reads_at_most_one_byte_over_the_limit() -> None:
    async def scenario() -> tuple[int, int]:
        part = UploadFile(content_type="image/png", filename="big.png")
        await part.write(b"\0" * 50_000)
        await part.seek(0)
        with pytest.raises(ApiError) as caught:
            await upload(part, "image", 1000)
        return caught.value.status, part.file.tell()

    assert asyncio.run(scenario()) == (413, 1001)


def test_a_file_sent_as_a_plain_field(server: ServerProcess) -> None:
    """`curl -F 'image=<photo.png'` sends the bytes without a filename: a file field takes it as the file;
    any other field that is not text is a 400 naming it."""
    png = encoded(Image.new("RGB", (64, 64), (90, 20, 200)), "PNG")
    form = {"size": "64x64", "steps": "1", "seed": "5", "response_format": "b64_json"}
    plain = httpx.post(server.url + VARY, data=form, files={"image": (None, png)}, timeout=120)
    assert plain.status_code == 200, plain.text
    as_file = httpx.post(server.url + VARY, data=form, files={"image": ("a.png", png, "image/png")}, timeout=120)
    assert plain.json()["data"][0]["b64_json"] == as_file.json()["data"][0]["b64_json"]
    bad = httpx.post(server.url + EDIT, data=form, files={"image": ("a.png", png, "image/png"),
                                                          "prompt": (None, b"\xff\xfe not text")}, timeout=120)
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["param"] == "prompt"


def _raw(server: ServerProcess, head: bytes, body: bytes = b"", read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + body)
        if not read:
            return b""
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def test_a_client_that_aborts_its_upload_is_not_a_500(server: ServerProcess) -> None:
    before = metric(server, "sdserve_requests_total", 'status="500"')
    head = (b"POST " + EDIT.encode() + b" HTTP/1.1\r\nHost: x\r\nx-request-id: aborted-upload-1\r\n"
            b"Content-Type: multipart/form-data; boundary=BOUNDARY\r\nContent-Length: 300000\r\n\r\n")
    body = b'--BOUNDARY\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + b"\0" * 5000
    _raw(server, head, body, read=False)
    lines = server.log_lines("aborted-upload-1", "sdserve.access")
    assert len(lines) == 1 and " 499 " in lines[0], lines
    assert metric(server, "sdserve_requests_total", 'status="500"') == before
    assert "internal error" not in server.log()


def test_encoded_newlines_cannot_forge_log_lines(server: ServerProcess) -> None:
    forged = "FORGED-LINE-77 INFO sdserve.access admin GET /v1/secret 200"
    head = (b"GET /v1/images/files/x%0A" + forged.replace(" ", "%20").encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"x-request-id: forge-1\r\nConnection: close\r\n\r\n")
    assert _raw(server, head).startswith(b"HTTP/1.1 404")
    lines = server.log_lines("FORGED-LINE-77")
    assert lines and all("forge-1" in line and "%0A" in line for line in lines), lines


@pytest.mark.parametrize("path", ["/v1/images/files/../../etc/passwd", "/v1/images/files/..",
                                  "/v1/images/files/..%2F..%2Fetc%2Fpasswd"])
def test_traversal_paths_are_404(server: ServerProcess, path: str) -> None:
    """Sent raw: httpx would normalize the dots away before they reach the server."""
    answer = _raw(server, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
    assert b"root:" not in answer


def test_a_full_queue_is_429_before_any_upload_is_decoded(server: ServerProcess) -> None:
    """tiny-sd21 takes 1 render + 8 waiting. With those held, a broken upload is refused for room (429),
    not decoded (which would answer 400)."""
    body = b'{"model": "tiny-sd21", "prompt": "hold", "size": "512x512", "steps": 150, "n": 4}'
    head = (b"POST " + GEN.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    wait_until_idle(server, 'model="tiny-sd21"')  # the server is shared: earlier tests' work must be done first
    holders = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(9)]
    try:
        for sock in holders:
            sock.sendall(head + body)
        until("the holders fill the queue", lambda: metric(server, "sdserve_queue_depth", 'model="tiny-sd21"') >= 8)
        response = httpx.post(server.url + VARY, data={"model": "tiny-sd21"}, timeout=60,
                              files={"image": ("a.png", b"not an image at all", "image/png")})
        assert response.status_code == 429, response.text
        assert response.json()["error"]["code"] == "queue_full"
    finally:
        for sock in holders:
            sock.close()
    wait_until_idle(server, 'model="tiny-sd21"')  # the holders' renders stop at their next step
    again = httpx.post(server.url + VARY, data={"model": "tiny-sd21"}, timeout=60,
                       files={"image": ("a.png", b"not an image at all", "image/png")})
    assert again.status_code == 400 and again.json()["error"]["code"] == "invalid_image_format"



def test_json_edits_take_an_image_and_a_mask_at_the_upload_limit(models_dir: Path, tmp_path: Path) -> None:
    """Data URLs carry the upload limit per file (api.md), so a JSON edit holds two files of up to
    `--max-upload-bytes` each, base64 making each a third larger: the body limit must allow that."""
    limit = 2_000_000
    process = ServerProcess("standalone", ["--models-dir", str(models_dir), "--model", "tiny-sd15", "--images-dir",
                                           str(tmp_path / "images"), "--max-upload-bytes", str(limit)],
                            tmp_path).start()
    try:
        rng = np.random.default_rng(0)
        files = []
        for _ in range(2):  # random RGBA does not compress: ~1.96 MB of PNG each
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (700, 700, 4), dtype=np.uint8), "RGBA").save(buffer, "PNG")
            files.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
            assert limit * 0.95 < buffer.tell() <= limit
        body = {"prompt": "p", "images": [{"image_url": files[0]}], "mask": {"image_url": files[1]}, **SMALL}
        answer = httpx.post(process.url + EDIT, json=body, timeout=120)
        assert answer.status_code == 200, answer.text
    finally:
        process.stop()
