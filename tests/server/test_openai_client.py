"""The official `openai` package against a real server: generate, edit, vary; URLs download; seeds."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import msgspec
import numpy as np
import openai
import pytest
from openai import OpenAI
from openai.types import ImagesResponse
from PIL import Image
from tokenizers import Tokenizer

from engines import limits
from tests.processes import ServerProcess

FAST = {"steps": 2}


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def rgba(width: int, height: int, transparent_box: tuple[int, int, int, int] | None = None) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    pixels[:, :, 3] = 255
    if transparent_box:
        x0, y0, x1, y1 = transparent_box
        pixels[y0:y1, x0:x1, 3] = 0
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def opaque_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("size", ["64x64", "256x256", "512x512", "128x64", "64x192", "auto"])
def test_generate_each_size_class(client: OpenAI, size: str) -> None:
    result = client.images.generate(prompt="a red bicycle", size=size, response_format="b64_json",
                                    extra_body=FAST)
    expected = (256, 256) if size == "auto" else tuple(int(s) for s in size.split("x"))
    assert decode(result.data[0].b64_json).size == expected
    assert result.model_dump()["size"] == f"{expected[0]}x{expected[1]}"


def test_generate_url_and_download(client: OpenAI, server: ServerProcess) -> None:
    args = {"prompt": "a lighthouse", "n": 3, "size": "64x64", "extra_body": {**FAST, "seed": 40}}
    result = client.images.generate(**args)
    assert len(result.data) == 3
    urls = [item.url for item in result.data]
    assert len(set(urls)) == 3
    assert item_b64_absent(result)
    inline = client.images.generate(**args, response_format="b64_json")
    for url, item in zip(urls, inline.data, strict=True):
        assert url.startswith(server.url + "/v1/images/files/")
        response = httpx.get(url)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.content == base64.b64decode(item.b64_json)  # the URL serves the rendered image


def item_b64_absent(result: object) -> bool:
    return all(item.b64_json is None for item in result.data)


def test_b64_json_n3_with_seeds(client: OpenAI) -> None:
    result = client.images.generate(prompt="a forest", n=3, size="64x64", response_format="b64_json",
                                    extra_body={**FAST, "seed": 500})
    assert [item.model_dump()["seed"] for item in result.data] == [500, 501, 502]
    assert all(item.url is None for item in result.data)
    single = client.images.generate(prompt="a forest", size="64x64", response_format="b64_json",
                                    extra_body={**FAST, "seed": 502})
    third, alone = np.asarray(decode(result.data[2].b64_json)), np.asarray(decode(single.data[0].b64_json))
    assert np.abs(third.astype(int) - alone.astype(int)).max() <= 1  # same image (8-bit rounding aside)


def test_seed_reproduces_exactly(client: OpenAI) -> None:
    args = {"prompt": "a storm at sea", "size": "64x64", "response_format": "b64_json",
            "extra_body": {**FAST, "seed": 7, "sampler": "dpmpp_2m"}}
    assert client.images.generate(**args).data[0].b64_json == client.images.generate(**args).data[0].b64_json


def test_random_seed_is_returned_and_reproduces(client: OpenAI) -> None:
    first = client.images.generate(prompt="a cat", size="64x64", response_format="b64_json", extra_body=FAST)
    seed = first.data[0].model_dump()["seed"]
    again = client.images.generate(prompt="a cat", size="64x64", response_format="b64_json",
                                   extra_body={**FAST, "seed": seed})
    assert first.data[0].b64_json == again.data[0].b64_json


def test_extensions_change_the_image(client: OpenAI) -> None:
    base = {"prompt": "a mountain", "size": "64x64", "response_format": "b64_json"}
    plain = client.images.generate(**base, extra_body={**FAST, "seed": 1}).data[0].b64_json
    for extra in ({"negative_prompt": "snow"}, {"guidance_scale": 12.0}, {"sampler": "euler_a"}, {"steps": 3}):
        changed = client.images.generate(**base, extra_body={**FAST, "seed": 1, **extra}).data[0].b64_json
        assert changed != plain, extra


@pytest.mark.parametrize("output_format", ["jpeg", "webp", "png"])
def test_output_formats(client: OpenAI, output_format: str) -> None:
    result = client.images.generate(prompt="a boat", size="64x64", response_format="b64_json",
                                    extra_body={**FAST, "output_format": output_format, "output_compression": 50})
    assert decode(result.data[0].b64_json).format == output_format.upper()
    assert result.model_dump()["output_format"] == output_format


def test_openai_model_names_map_to_the_default(client: OpenAI) -> None:
    for name in ("dall-e-2", "dall-e-3", "gpt-image-1"):
        result = client.images.generate(model=name, prompt="a kite", size="64x64", extra_body=FAST)
        assert result.model_dump()["model"] == "tiny-sd15"
    other = client.images.generate(model="tiny-sdxl", prompt="a kite", size="64x64", extra_body=FAST)
    assert other.model_dump()["model"] == "tiny-sdxl"


def test_quality_and_style_are_accepted(client: OpenAI) -> None:
    reported = {"standard": "medium", "hd": "high", "low": "low", "medium": "medium", "high": "high",
                "auto": "medium"}  # OpenAI's response enum is low, medium, high
    for quality, expected in reported.items():
        result = client.images.generate(prompt="a tree", size="64x64", quality=quality, style="natural",
                                        extra_body={"steps": 1})
        assert result.quality == expected


def test_edit_with_mask(client: OpenAI) -> None:
    image = opaque_png(96, 64)
    mask = rgba(96, 64, transparent_box=(0, 0, 48, 64))
    result = client.images.edit(image=("image.png", image, "image/png"), mask=("mask.png", mask, "image/png"),
                                prompt="a sun", size="96x64", n=2, response_format="b64_json", extra_body=FAST)
    assert len(result.data) == 2
    edited = np.asarray(decode(result.data[0].b64_json).convert("RGB")).astype(int)
    original = np.asarray(Image.open(io.BytesIO(image)).convert("RGB")).astype(int)
    # The opaque half of the mask keeps the image (up to the VAE's round trip); the transparent half changes.
    assert np.abs(edited[:, 56:] - original[:, 56:]).mean() < np.abs(edited[:, :40] - original[:, :40]).mean()


def test_edit_without_mask_reimagines_the_image(client: OpenAI) -> None:
    args = {"image": ("photo.jpg", opaque_png(64, 64), "image/jpeg"), "prompt": "winter", "size": "64x64",
            "extra_body": {**FAST, "seed": 21}}
    result = client.images.edit(**args, response_format="url")
    download = httpx.get(result.data[0].url)
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    inline = client.images.edit(**args, response_format="b64_json")
    assert download.content == base64.b64decode(inline.data[0].b64_json)  # the URL serves this very image
    original = np.asarray(Image.open(io.BytesIO(opaque_png(64, 64)))).astype(int)
    assert np.abs(np.asarray(Image.open(io.BytesIO(download.content)).convert("RGB")) - original).mean() > 1


def test_edit_uses_the_images_alpha_when_no_mask(client: OpenAI) -> None:
    image = rgba(64, 64, transparent_box=(0, 0, 32, 64))
    result = client.images.edit(image=("image.png", image, "image/png"), prompt="a moon", size="64x64",
                                response_format="b64_json", extra_body={**FAST, "seed": 3})
    # The very same pixels, all opaque: only the alpha channel differs, so only the mask can tell them apart.
    plain = client.images.edit(image=("image.png", rgba(64, 64), "image/png"), prompt="a moon", size="64x64",
                               response_format="b64_json", extra_body={**FAST, "seed": 3})
    assert result.data[0].b64_json != plain.data[0].b64_json


def test_edit_accepts_a_list_of_images(client: OpenAI) -> None:
    """`image[]` with two different images: the first is used."""
    first, second = rgba(64, 64), opaque_png(64, 64)
    args = {"prompt": "two images", "size": "64x64", "response_format": "b64_json",
            "extra_body": {**FAST, "seed": 9}}
    both = client.images.edit(image=[("a.png", first, "image/png"), ("b.png", second, "image/png")], **args)
    alone = client.images.edit(image=("a.png", first, "image/png"), **args)
    other = client.images.edit(image=("b.png", second, "image/png"), **args)
    assert both.data[0].b64_json == alone.data[0].b64_json != other.data[0].b64_json


def test_create_variation(client: OpenAI) -> None:
    result = client.images.create_variation(image=("cat.png", opaque_png(80, 48), "image/png"), n=2, size="64x64",
                                            response_format="b64_json", extra_body=FAST)
    assert len(result.data) == 2 and decode(result.data[1].b64_json).size == (64, 64)


def prompt_tokens(model_dir: Path, *texts: str) -> int:
    """Text tokens, special tokens aside, as the model's own tokenizer file counts them (read with the
    tokenizers library, not through the server)."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer" / "tokenizer.json"))
    return sum(len(tokenizer.encode(text, add_special_tokens=False).ids) for text in texts)


def assert_usage(result: ImagesResponse, tokens: int) -> None:
    """OpenAI's `usage`, parsed by the SDK's own types: text tokens in, no image tokens either way."""
    usage = result.usage
    assert usage is not None, result
    assert (usage.input_tokens, usage.input_tokens_details.text_tokens, usage.input_tokens_details.image_tokens,
            usage.output_tokens, usage.total_tokens) == (tokens, tokens, 0, 0, tokens), usage


def test_every_response_reports_usage(client: OpenAI, models_dir: Path) -> None:
    prompt, negative = "a red bicycle at dawn", "fog, blur"
    tokens = prompt_tokens(models_dir / "tiny-sd15", prompt, negative)
    assert tokens > 2
    extra = {**FAST, "negative_prompt": negative}
    assert_usage(client.images.generate(prompt=prompt, size="64x64", extra_body=extra), tokens)
    assert_usage(client.images.edit(image=("a.png", opaque_png(64, 64), "image/png"), prompt=prompt, size="64x64",
                                    extra_body=extra), tokens)
    assert_usage(client.images.create_variation(image=("a.png", opaque_png(64, 64), "image/png"), size="64x64",
                                                extra_body=FAST), 0)  # a variation reads no prompt


def test_headers(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/v1/images/generations", headers={"x-request-id": "trace-123"},
                          json={"prompt": "a cup", "size": "64x64", "steps": 2}, timeout=120)
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-123"
    timing = response.headers["server-timing"]
    for stage in ("queue", "text_encoder", "unet", "vae_decoder", "encode"):
        assert f"{stage};dur=" in timing
    generated = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x", "size": "64x64", "steps": 1},
                           timeout=120)
    assert len(generated.headers["x-request-id"]) >= 16


def test_models_route(client: OpenAI) -> None:
    listed = {model.id: model for model in client.models.list()}
    assert set(listed) == {"tiny-sd15", "tiny-sd15-inpaint", "tiny-sd21", "tiny-sdxl"}
    card = listed["tiny-sdxl"]
    assert card.object == "model" and card.owned_by == "sdserve"
    assert card.model_dump()["family"] == "sdxl"
    assert card.model_dump()["sizes"] == {"min": 64, "max": 512, "step": 16}
    # the request bounds and strength defaults, as the engines enforce them (what the playground's form reads)
    assert card.model_dump()["limits"] == msgspec.to_builtins(limits.BOUNDS)
    assert card.model_dump()["default_strength"] == {"image": limits.default_strength(False),
                                                     "mask": limits.default_strength(True),
                                                     "variation": limits.default_strength(False, variation=True)}


def test_models_retrieve(client: OpenAI) -> None:
    assert client.models.retrieve("tiny-sd21").model_dump()["family"] == "sd2"
    assert client.models.retrieve("dall-e-3").id == "tiny-sd15"  # an OpenAI name: the default model's card
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.body["param"] == "model" and caught.value.body["code"] == "model_not_found"


def test_health_and_openapi(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["status"] == "ready" and "tiny-sd15" in ready["models"]
    schema = httpx.get(f"{server.url}/schema/openapi.json").json()
    assert schema["openapi"].startswith("3.1")
    for path in ("/v1/images/generations", "/v1/images/edits", "/v1/images/variations", "/v1/models",
                 "/v1/images/files/{name}", "/healthz", "/readyz", "/metrics"):
        assert path in schema["paths"], path
    generation = schema["components"]["schemas"]["ImageGenerationRequest"]
    assert {"prompt", "n", "size", "seed", "steps", "sampler"} <= set(generation["properties"])
