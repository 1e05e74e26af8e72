"""LoRA per render: equal to diffusers' load_lora_weights + set_adapters from the same latents, for SD 1.x,
2.x and SDXL, adapters in the diffusers and kohya formats; refusals name what is wrong."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import engines
from bench.reference import diffusers_scheduler
from engines import limits, lora
from export import presets, tiny
from tests import adapters
from tests.engines import batches

FAMILIES = ("tiny-sd15", "tiny-sd21", "tiny-sdxl")
WIDTH, HEIGHT, STEPS, GUIDANCE = 64, 64, 3, 6.0
PROMPT, NEGATIVE = "a photo of a red cat", "blurry"
TOLERANCE = 1e-4
CASES = {  # what a request asks for → the adapters diffusers loads with the same weights
    "one": [("full", 0.8)],
    "two, kohya, negative": [("full", 0.7), ("kohya", -1.3)],
    "text encoders only": [("text", 1.5)],
    "unet only, kohya": [("unetk", 2.0)],
}


@pytest.fixture(scope="session")
def lora_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per family: a folder with a diffusers adapter on every part (alpha from its metadata), a kohya one
    (alpha ≠ rank), a text-encoder-only and a kohya UNet-only one."""
    folders = {}
    for index, name in enumerate(FAMILIES):
        folder = tmp_path_factory.mktemp(f"lora-{name}")
        texts = ("text_encoder", "text_encoder_2") if name == "tiny-sdxl" else ("text_encoder",)
        adapters.make(folder, "full", name, ("unet", *texts), rank=4, alpha=8, seed=10 * index)
        adapters.make(folder, "kohya", name, ("unet", *texts), rank=2, alpha=3, seed=10 * index + 3, kohya=True)
        adapters.make(folder, "text", name, texts, rank=3, alpha=3, seed=10 * index + 5)
        adapters.make(folder, "unetk", name, ("unet",), rank=4, alpha=1.5, seed=10 * index + 7, kohya=True)
        if name == "tiny-sdxl":
            adapters.make(folder, "sgm", name, ("unet", *texts), rank=2, alpha=1, seed=40, kohya=True, sgm=True)
        folders[name] = folder
    return folders


class _Lazy(dict):
    """Built on first use per family, so that running one family's tests exports only that model."""

    def __init__(self, make: Callable[[str], object]) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, name: str) -> object:
        self[name] = self.make(name)
        return self[name]


@pytest.fixture(scope="module")
def pipelines(lora_model: Callable[[str], Path], lora_dirs: dict[str, Path]) -> dict[str, engines.Pipeline]:
    return _Lazy(lambda name: engines.load(lora_model(name), backend="cpu", lora_dir=lora_dirs[name]))


def _latents(name: str) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)


def _ours(pipeline: engines.Pipeline, choice: list[tuple[str, float]], name: str) -> np.ndarray:
    request = engines.RenderRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=WIDTH, height=HEIGHT,
                                    steps=STEPS, guidance_scale=GUIDANCE, sampler="euler", seed=0, lora=choice)
    return pipeline.render(request, latents=_latents(name)).pixels


@pytest.fixture(scope="module")
def references(lora_dirs: dict[str, Path]) -> dict[str, object]:
    """Per family the diffusers pipeline with every adapter of its folder loaded (set_adapters picks)."""
    def make(name: str) -> object:
        pipe = tiny.build(presets.get(name))
        pipe.scheduler = diffusers_scheduler("euler", dict(pipe.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        for path in sorted(lora_dirs[name].glob("*.safetensors")):
            pipe.load_lora_weights(str(path), adapter_name=path.stem)
        return pipe

    return _Lazy(make)


def _reference(pipe: object, name: str, choice: list[tuple[str, float]]) -> np.ndarray:
    pipe.set_adapters([a for a, _ in choice], adapter_weights=[s for _, s in choice])
    with torch.no_grad():
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, width=WIDTH, height=HEIGHT, num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE, latents=torch.from_numpy(_latents(name)), output_type="np").images


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", FAMILIES)
def test_lora_equals_diffusers(pipelines: dict, references: dict, name: str, case: str) -> None:
    choice = CASES[case]
    expected = _reference(references[name], name, choice)
    ours = _ours(pipelines[name], choice, name)
    plain = _ours(pipelines[name], [], name)
    assert np.abs(ours - plain).max() > 1e-2, "the adapters changed nothing: the comparison would prove nothing"
    difference = float(np.abs(ours - expected).max())
    assert difference <= TOLERANCE, f"{name} {case}: max pixel difference {difference:.2e}"


def test_kohya_sdxl_with_sgm_block_names(pipelines: dict, references: dict, lora_dirs: dict) -> None:
    """kohya's SDXL files name UNet blocks as the original UNet does (input_blocks_3_1_…)."""
    choice = [("sgm", 1.2)]
    with safe_open(str(lora_dirs["tiny-sdxl"] / "sgm.safetensors"), "numpy") as f:
        assert any("input_blocks_3_1" in key for key in f.keys())  # noqa: SIM118 - safe_open has no __iter__
    difference = np.abs(_ours(pipelines["tiny-sdxl"], choice, "tiny-sdxl") -
                        _reference(references["tiny-sdxl"], "tiny-sdxl", choice)).max()
    assert difference <= TOLERANCE


def test_pipeline_lists_its_adapters(pipelines: dict) -> None:
    listed = {a.name: a for a in pipelines["tiny-sdxl"].adapters}
    assert set(listed) == {"full", "kohya", "text", "unetk", "sgm"}
    assert listed["full"].parts == ["unet", "text_encoder", "text_encoder_2"] and listed["full"].rank == 4
    assert listed["kohya"].format == "kohya" and listed["unetk"].parts == ["unet"]
    assert pipelines["tiny-sdxl"].info.adapters == pipelines["tiny-sdxl"].adapters


def test_concurrent_renders_keep_their_own_adapters(pipelines: dict) -> None:
    pipeline = pipelines["tiny-sd15"]
    choices = [[("full", 1.0)], [("unetk", -2.0)]]
    alone = [_ours(pipeline, c, "tiny-sd15") for c in choices]
    together: list[np.ndarray | None] = [None, None]

    def render(i: int) -> None:
        for _ in range(3):
            together[i] = _ours(pipeline, choices[i], "tiny-sd15")

    threads = [threading.Thread(target=render, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert np.abs(alone[0] - alone[1]).max() > 1e-2
    for i in range(2):
        assert np.array_equal(together[i], alone[i])


def test_batched_renders_keep_their_own_adapters(pipelines: dict) -> None:
    """Renders with the same adapters share UNet calls; other adapters (or none) take calls of their own
    (the adapters are fed per call, not per row), interleaved step by step. Each image equals its render alone."""
    pipeline = pipelines["tiny-sd15"]
    mix = [([("full", 0.8)], 1), ([("full", 0.8)], 2), ([], 3), ([("full", 0.7), ("kohya", -1.3)], 4), ([], 5)]
    requests = [engines.RenderRequest(prompt=PROMPT, width=WIDTH, height=HEIGHT, steps=STEPS, guidance_scale=GUIDANCE,
                                      seed=seed, lora=choice) for choice, seed in mix]
    renderings, calls = batches.run(pipeline, [(i, lambda r=r: pipeline.begin(r)) for i, r in enumerate(requests)])
    assert {frozenset(call) for call in calls} >= {frozenset({0, 1}), frozenset({2, 4})}
    assert all(not {0, 2} <= set(call) and not {0, 3} <= set(call) for call in calls)
    for rendering, request in zip(renderings, requests, strict=True):
        np.testing.assert_allclose(rendering.result().pixels, pipeline.render(request).pixels, atol=1e-5)


def _refusal(pipeline: engines.Pipeline, choice: list[tuple[str, float]]) -> engines.InvalidRequest:
    with pytest.raises(engines.InvalidRequest) as caught:
        _ours(pipeline, choice, "tiny-sd15")
    assert caught.value.param == "lora"
    return caught.value


def test_refusals(pipelines: dict, lora_dirs: dict, tmp_path: Path, tiny_model: Callable[[str], Path]) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    adapters.locon(folder)
    (folder / "sdxl.safetensors").write_bytes((lora_dirs["tiny-sdxl"] / "full.safetensors").read_bytes())
    (folder / "xlunet.safetensors").write_bytes((lora_dirs["tiny-sdxl"] / "unetk.safetensors").read_bytes())
    pipeline = pipelines["tiny-sd15"]
    pipeline.load_adapters(folder)
    try:
        assert "LoCon" in _refusal(pipeline, [("locon", 1.0)]).message
        assert "text_encoder_2" in _refusal(pipeline, [("sdxl", 1.0)]).message
        wrong = _refusal(pipeline, [("xlunet", 1.0)])
        assert "another family" in wrong.message and wrong.code == "lora_incompatible"
        assert _refusal(pipeline, [("nope", 1.0)]).code == "lora_not_found"
    finally:
        pipeline.load_adapters(lora_dirs["tiny-sd15"])
    assert "at most 8" in _refusal(pipeline, [("full", 0.1)] * 9).message
    assert "[-4, 4]" in _refusal(pipeline, [("full", 4.5)]).message
    plain = engines.load(tiny_model("tiny-sd15"), backend="cpu", lora_dir=lora_dirs["tiny-sd15"])
    assert plain.adapters == [] and plain.info.lora_rank == 0
    assert "--lora-rank" in _refusal(plain, [("full", 1.0)]).message
    assert plain.render(engines.RenderRequest(prompt="x", width=64, height=64, steps=1, seed=0)).pixels.shape


def test_rank_cap(lora_dirs: dict, lora_model: Callable[[str], Path]) -> None:
    pipeline = engines.load(lora_model("tiny-sd15"), backend="cpu", lora_dir=lora_dirs["tiny-sd15"])
    cap = pipeline.info.lora_rank
    assert cap == 8
    assert pipeline.lora.choose([("full", 1.0), ("unetk", 1.0)]).feeds  # 4 + 4 in the UNet: at the cap
    with pytest.raises(engines.InvalidRequest, match="rank 10 in unet"):
        pipeline.lora.choose([("full", 1.0), ("unetk", 1.0), ("kohya", 1.0)])
    assert limits.MAX_ADAPTERS == 8


def test_tensorrt_profiles_carry_the_rank_axis(pipelines: dict) -> None:
    """Plans built from LoRA-capable graphs take rank 1 (no adapter) up to the export's cap: the feeds of a
    render without adapters and of one at the cap fit every LoRA input's range."""
    from engines import plans

    pipeline = pipelines["tiny-sdxl"]
    manifest = pipeline.manifest
    profiles = plans.make_profiles(manifest, sizes=[(64, 64)], batch=(1, 2))
    at_cap = pipeline.lora.choose([("full", 1.0), ("unetk", -1.0)]).feeds  # rank 4 + 4 in the UNet
    assert next(iter(at_cap["unet"].values())).shape[1] == 8
    for component in ("text_encoder", "text_encoder_2", "unet"):
        (profile,) = plans.component_profiles(manifest, component, profiles)
        ranges = {r.name: r for r in profile.inputs if r.name.endswith((lora.DOWN, lora.UP))}
        assert len(ranges) == len(pipeline.lora.slots[component]) * 2
        zeros = pipeline.sessions[component].zeros
        for feeds in (zeros, at_cap.get(component, zeros)):
            assert all(ranges[name].contains(value.shape) for name, value in feeds.items())
        assert all(8 in r.max and 1 in r.opt for r in ranges.values())
