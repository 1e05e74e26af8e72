"""The openvino backend: in fp32 it renders what the cpu backend renders (every tiny model, mode and
sampler, LoRA, batching, streaming partials, tiled decodes); in bf16 it drifts from fp32 no more than
PyTorch's own bf16 autocast does on the same inputs; its compilations stay bounded and its disk cache
keeps precisions apart; a machine without the package falls back to ONNX Runtime in one log line."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import engines
from engines import images, vae_tiling
from engines.backends import openvino
from tests.conftest import TINY
from tests.engines import batches
from tests.engines.test_batching import MIXES
from tests.engines.test_lora import CASES, _Lazy, _ours, lora_dirs  # noqa: F401 - a fixture
from tests.engines.test_parity import (
    HEIGHT,
    MODES,
    NEGATIVE,
    PROMPT,
    STEPS,
    WIDTH,
    input_image,
    input_mask,
    recorded_draws,
    reference_call,
)

pytestmark = pytest.mark.skipif(not openvino.available(), reason="the openvino package is not installed")
Model = Callable[[str], Path]
ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4  # fp32: max difference to the cpu backend on 0–1 pixels
# bf16 against fp32, relative to PyTorch's bf16 autocast against fp32 on the same inputs (the tiny models,
# 4 steps): the mean pixel drift measured 0.8–1.3× PyTorch's, the largest pixel 0.7–1.6× (OpenVINO also
# computes the normalizations and softmax in bf16, which autocast keeps in fp32).
BF16_MEAN_RATIO, BF16_MAX_RATIO = 1.5, 2.0


def _has_bf16() -> bool:
    return openvino.available() and openvino.choose_precision("auto")[0] == "bf16"


@pytest.fixture(scope="module")
def cpu(tiny_model: Model) -> dict[str, engines.Pipeline]:
    return _Lazy(lambda name: engines.load(tiny_model(name), backend="cpu"))


@pytest.fixture(scope="module")
def fp32(tiny_model: Model) -> dict[str, engines.Pipeline]:
    return _Lazy(lambda name: engines.load(tiny_model(name), backend="openvino", precision="fp32"))


def _request(name: str, mode: str, sampler: str) -> engines.RenderRequest:
    inputs: dict[str, object] = {}
    if mode == "img2img":
        inputs = {"image": input_image(), "strength": 0.6}
    elif mode == "inpaint":
        inputs = {"image": input_image(), "mask": input_mask("box"), "strength": 0.75}
    return engines.RenderRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=WIDTH, height=HEIGHT, steps=STEPS,
                                 guidance_scale=6.0, sampler=sampler, seed=3, **inputs)


@pytest.mark.parametrize("sampler", engines.SAMPLERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", TINY)
def test_fp32_renders_what_the_cpu_backend_renders(cpu: dict, fp32: dict, name: str, mode: str, sampler: str) -> None:
    request = _request(name, mode, sampler)
    assert "OpenVINO fp32" in fp32[name].info.device and fp32[name].info.backend == "openvino"
    difference = float(np.abs(fp32[name].render(request).pixels - cpu[name].render(request).pixels).max())
    assert difference <= TOLERANCE, f"{name} {mode} {sampler}: max pixel difference {difference:.2e}"


@pytest.mark.skipif(not _has_bf16(), reason="this processor has no bf16 instructions")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", TINY)
def test_bf16_drifts_no_more_than_pytorch_autocast(tiny_model: Model, name: str, mode: str) -> None:
    from export import presets, tiny

    pipeline = engines.load(tiny_model(name), backend="openvino")
    assert "OpenVINO bf16" in pipeline.info.device
    strength = {"txt2img": 1.0, "img2img": 0.6, "inpaint": 0.75}[mode]
    reference, args = reference_call(tiny.build(presets.get(name)), name, mode, "euler", 6.0, NEGATIVE, strength)
    ours = args.pop("_ours")
    with recorded_draws() as draws, torch.no_grad():
        exact = reference(**args).images
    args["generator"] = torch.Generator().manual_seed(1234)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = reference(**args).images.astype(np.float32)
    request = engines.RenderRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=WIDTH, height=HEIGHT, steps=STEPS,
                                    guidance_scale=6.0, sampler="euler", seed=0, **ours)
    noise = engines.Noise(posterior=(draws["posterior"] or [None])[0],
                          masked_posterior=(draws["masked_posterior"] or [None])[0], steps=draws["steps"] or None)
    pixels = pipeline.render(request, latents=draws["latents"][0], noise=noise).pixels
    theirs, drift = np.abs(autocast - exact), np.abs(pixels - exact)
    assert drift.mean() > 0, "bf16 changed nothing: it did not run in bf16"
    assert drift.mean() <= BF16_MEAN_RATIO * theirs.mean(), (drift.mean(), theirs.mean())
    assert drift.max() <= BF16_MAX_RATIO * theirs.max(), (drift.max(), theirs.max())


@pytest.mark.parametrize("case", ["two, kohya, negative", "unet only, kohya"])
def test_lora_adapters_as_on_the_cpu_backend(lora_model: Model, lora_dirs: dict, case: str) -> None:  # noqa: F811
    on = {backend: engines.load(lora_model("tiny-sd15"), backend=backend, precision="fp32" if backend == "openvino"
                                else "auto", lora_dir=lora_dirs["tiny-sd15"]) for backend in ("cpu", "openvino")}
    ours = _ours(on["openvino"], CASES[case], "tiny-sd15")
    assert np.abs(ours - _ours(on["openvino"], [], "tiny-sd15")).max() > 1e-2, "the adapters changed nothing"
    assert np.abs(ours - _ours(on["cpu"], CASES[case], "tiny-sd15")).max() <= TOLERANCE


def test_batched_renders_give_their_images_alone(fp32: dict) -> None:
    """Renders sharing UNet calls (rows that vary from call to call: shapes compiled as they come)."""
    pipeline = fp32["tiny-sd15"]
    renderings, calls = batches.run(pipeline, [(call, lambda r=r: pipeline.begin(r)) for call, r in MIXES["tiny-sd15"]])
    assert any(len(call) > 1 for call in calls)
    for rendering, (_, request) in zip(renderings, MIXES["tiny-sd15"], strict=True):
        assert np.abs(rendering.result().pixels - pipeline.render(request).pixels).max() <= TOLERANCE


def test_streaming_partials_leave_the_final_image_alone(fp32: dict, cpu: dict) -> None:
    pipeline = fp32["tiny-sdxl"]
    request = _request("tiny-sdxl", "txt2img", "euler_a")
    partials: list[engines.Partial] = []
    streamed = pipeline.render(request, on_partial=partials.append, partial_images=2)
    assert [(p.partial_index, p.step) for p in partials] == [(0, 2), (1, 3)]
    assert np.array_equal(streamed.pixels, pipeline.render(request).pixels)
    assert np.abs(streamed.pixels - cpu["tiny-sdxl"].render(request).pixels).max() <= TOLERANCE


def test_tiled_decodes_as_the_cpu_backend(fp32: dict, cpu: dict) -> None:
    latents = np.random.default_rng(2).standard_normal((1, 4, 136, 144)).astype(np.float32)  # above both thresholds
    tiled = fp32["tiny-sd15"].decode_latents(latents)
    assert tiled.shape == (1, 1088, 1152, 3)
    assert np.abs(tiled - cpu["tiny-sd15"].decode_latents(latents)).max() <= TOLERANCE


def test_decodes_up_to_1024_pixels_whole(fp32: dict) -> None:
    """Above ONNX Runtime's tiling threshold, OpenVINO still decodes whole (its bf16 decode of 1024² needs 1.7 GiB,
    and whole is faster than tiled): the pixels are the graph's own, no tile seams."""
    pipeline = fp32["tiny-sd15"]
    latents = np.random.default_rng(2).standard_normal((1, 4, 100, 128)).astype(np.float32)
    assert vae_tiling.THRESHOLD < 100 * 128
    whole = pipeline.sessions["vae_decoder"].run({"latent_sample": latents / pipeline.manifest.vae_scaling_factor},
                                                  ["sample"])["sample"]
    assert np.array_equal(pipeline.decode_latents(latents), images.to_pixels(whole))


def test_one_compilation_serves_every_shape(fp32: dict, cpu: dict) -> None:
    """Sizes, prompt windows and rows that vary from call to call run on the one (dynamic) compilation."""
    for side, n, prompt in ((96, 1, "a cat"), (144, 2, "a cat " * 60), (64, 3, "a dog")):
        request = engines.RenderRequest(prompt=prompt, width=side, height=64, steps=2, seed=side, n=n)
        assert np.abs(fp32["tiny-sd15"].render(request).pixels - cpu["tiny-sd15"].render(request).pixels).max() \
            <= TOLERANCE


@pytest.mark.skipif(not _has_bf16(), reason="this processor has no bf16 instructions")
def test_the_disk_cache_keeps_precisions_apart(tiny_model: Model, tmp_path: Path) -> None:
    """OpenVINO's own cache key leaves out the precision: an fp32 compilation loaded for bf16 computed NaN."""
    code = ("import sys, numpy as np, engines\n"
            "r = engines.RenderRequest(prompt='a cat', width=64, height=64, steps=2, seed=1)\n"
            "for p in ('fp32', 'bf16'):\n"
            "    px = engines.load(sys.argv[1], backend='openvino', precision=p).render(r).pixels\n"
            "    print(p, np.isfinite(px).all(), float(px.mean()))\n")
    result = subprocess.run([sys.executable, "-c", code, str(tiny_model("tiny-sd15"))], capture_output=True,
                            text=True, cwd=ROOT, timeout=300, env=_env(tmp_path))
    lines = [line.split() for line in result.stdout.splitlines()]
    assert result.returncode == 0 and [line[:2] for line in lines] == [["fp32", "True"], ["bf16", "True"]], result
    assert abs(float(lines[0][2]) - float(lines[1][2])) < 0.01


def test_without_the_package_auto_falls_back_in_one_line(tiny_model: Model, tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "openvino"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('openvino is not installed here')\n")
    code = ("import logging, sys, engines\n"
            "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
            "print(engines.load(sys.argv[1], backend='auto').info.backend)\n"
            "try:\n"
            "    engines.load(sys.argv[1], backend='openvino')\n"
            "except engines.EngineFailure as exc:\n"
            "    print(exc)\n")
    env = _env(tmp_path, pythonpath=f"{shadow.parent}:{ROOT}")
    result = subprocess.run([sys.executable, "-c", code, str(tiny_model("tiny-sd15"))], capture_output=True,
                            text=True, cwd=ROOT, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    chosen, refusal = result.stdout.splitlines()
    assert chosen == "cpu" and "pip install openvino" in refusal
    mentions = [line for line in result.stderr.splitlines() if "openvino" in line]
    assert len(mentions) == 1 and mentions[0].startswith("WARNING") and "fp32" in mentions[0], result.stderr


def test_precision_is_checked(tiny_model: Model) -> None:
    for backend, precision in (("cpu", "bf16"), ("openvino", "fp16"), ("cuda", "fp32")):
        with pytest.raises(engines.InvalidRequest) as caught:
            engines.load(tiny_model("tiny-sd15"), backend=backend, precision=precision)
        assert caught.value.param == "precision"
    assert engines.load(tiny_model("tiny-sd15"), backend="auto", precision="fp32").info.backend == "openvino"


def _env(tmp_path: Path, pythonpath: str = str(ROOT)) -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": pythonpath, "SDSERVE_CACHE_DIR": str(tmp_path / "cache")}
