"""api.md details a stock client or operator sees: the quality/style mapping, `user` logged as a hash only,
the OpenAPI error bodies and file parts, the metrics content type, inputs fitted before they travel."""

from __future__ import annotations

import hashlib
import io

import httpx
import pytest
from PIL import Image

from engines import manifest as mf
from engines.info import ModelInfo
from server.openai import requests as orders
from server.openai.uploads import Upload
from server.protocol import ImageGenerationRequest
from server.settings import Settings
from tests.processes import ServerProcess

GEN = "/v1/images/generations"


def info(variant: str = "base", steps: int = 20, guidance: float = 7.5) -> ModelInfo:
    return ModelInfo(id="m", name="m", family="sd1", variant=variant, prediction_type="epsilon",
                     sizes=mf.Sizes(64, 1024, 64), defaults=mf.Defaults(512, 512, steps, guidance, "euler"),
                     max_batch=4, inpainting_unet=False, samplers=mf.SAMPLERS, backend="cpu", device="cpu")


@pytest.mark.parametrize(("quality", "variant", "default", "expected"), [
    (None, "base", 20, 20), ("standard", "base", 20, 20), ("auto", "base", 20, 20), ("medium", "base", 20, 20),
    ("hd", "base", 20, 30), ("high", "base", 40, 60), ("hd", "turbo", 4, 6), ("low", "base", 20, 10),
    ("low", "turbo", 1, 1),
])
def test_quality_maps_to_steps(quality: str | None, variant: str, default: int, expected: int) -> None:
    request = ImageGenerationRequest(prompt="p", quality=quality)
    assert orders.resolve_steps(request, info(variant, default)) == expected


def test_style_maps_to_guidance_and_explicit_values_win() -> None:
    model = info(guidance=7.5)
    assert orders.resolve_guidance(ImageGenerationRequest(prompt="p", style="vivid"), model) == 7.5
    assert orders.resolve_guidance(ImageGenerationRequest(prompt="p", style="natural"), model) == 5.25
    explicit = ImageGenerationRequest(prompt="p", quality="hd", style="natural", steps=3, guidance_scale=9.0)
    assert (orders.resolve_steps(explicit, model), orders.resolve_guidance(explicit, model)) == (3, 9.0)


def _image(server: ServerProcess, **fields: object) -> str:
    body = {"prompt": "a harbour", "size": "64x64", "seed": 11, "response_format": "b64_json", **fields}
    response = httpx.post(server.url + GEN, json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["data"][0]["b64_json"]


def test_quality_and_style_reach_the_render(server: ServerProcess) -> None:
    """tiny-sd15 defaults to 8 steps and guidance 7.5: each mapped request renders the very image that its
    explicit steps / guidance give."""
    assert _image(server, quality="standard") == _image(server, steps=8)
    assert _image(server, quality="low") == _image(server, steps=4)
    assert _image(server, quality="hd") == _image(server, steps=30)
    assert _image(server, style="natural") == _image(server, guidance_scale=5.25)
    assert _image(server, quality="hd", style="natural", steps=2, guidance_scale=7.5) == _image(server, steps=2)


def test_user_is_logged_as_a_hash_only(server: ServerProcess) -> None:
    user = "alice.contract@example.com"
    response = httpx.post(server.url + GEN, headers={"x-request-id": "user-hash-1"}, timeout=120,
                          json={"prompt": "p", "size": "64x64", "steps": 1, "user": user})
    assert response.status_code == 200
    lines = server.log_lines("user-hash-1", "sdserve.access")
    assert len(lines) == 1
    assert f"user={hashlib.sha256(user.encode()).hexdigest()[:12]}" in lines[0]
    assert user not in server.log()


def test_empty_json_body_says_so(server: ServerProcess) -> None:
    response = httpx.post(server.url + GEN, content=b"", headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "empty" in error["message"] and error["param"] is None


def test_metrics_content_type_has_one_charset(server: ServerProcess) -> None:
    """Prometheus 3 refuses a Content-Type with a repeated parameter."""
    content_type = httpx.get(server.url + "/metrics").headers["content-type"]
    assert content_type.replace(" ", "") == "text/plain;version=0.0.4;charset=utf-8"


def test_openapi_describes_error_bodies_and_file_parts(server: ServerProcess) -> None:
    schema = httpx.get(server.url + "/schema/openapi.json").json()
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path in ("/v1/images/generations", "/v1/images/edits", "/v1/images/variations"):
        responses = schema["paths"][path]["post"]["responses"]
        for status in ("400", "401", "404", "413", "415", "429", "500", "503", "504"):
            assert responses[status]["content"]["application/json"]["schema"] == error, (path, status)
    assert schema["paths"]["/v1/images/files/{name}"]["get"]["responses"]["404"]["content"][
        "application/json"]["schema"] == error
    detail = schema["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"message", "type", "param", "code"}
    edit = schema["components"]["schemas"]["ImageEditRequest"]["properties"]
    for part in ("image", "mask"):
        assert (edit[part]["type"], edit[part]["format"]) == ("string", "binary")
    assert edit["image[]"]["items"]["format"] == "binary"
    generation = schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    for name, low, high in (("n", 1, 10), ("output_compression", 0, 100), ("steps", 1, 150)):
        assert (generation[name]["minimum"], generation[name]["maximum"]) == (low, high), name
    # strength 0 would re-imagine nothing: the engines refuse it, so the API does too.
    strength = generation["strength"]
    assert (strength["exclusiveMinimum"], strength["maximum"]) == (0, 1) and "minimum" not in strength


def _png(size: tuple[int, int], mode: str = "RGB", alpha_box: tuple[int, int, int, int] | None = None) -> bytes:
    image = Image.new(mode, size, (200, 100, 50, 255) if mode == "RGBA" else (200, 100, 50))
    if alpha_box:
        image.paste((0, 0, 0, 0), alpha_box)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_inputs_are_fitted_to_the_render_size_before_they_travel() -> None:
    """An order carries the pixels it renders from, not the upload's: a node (behind a router) receives at most
    the target size, never a 16-megapixel PNG over its body limit."""
    settings = Settings()
    image = Upload(_png((800, 400), "RGBA", alpha_box=(0, 0, 400, 400)), "image")
    picture, mask = orders.edit_inputs(image, None, settings, (64, 96))
    assert Image.open(io.BytesIO(picture)).size == (64, 96)
    fitted_mask = Image.open(io.BytesIO(mask))
    assert fitted_mask.size == (64, 96) and fitted_mask.mode == "L"
    # Center crop of the 400-wide transparent left half: the crop's left part repaints, the right keeps.
    assert fitted_mask.getpixel((2, 48)) == 255 and fitted_mask.getpixel((61, 48)) == 0
    variation = orders.variation_input(Upload(_png((300, 500)), "image"), settings, (128, 64))
    assert Image.open(io.BytesIO(variation)).size == (128, 64)
