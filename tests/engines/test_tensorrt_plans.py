"""TensorRT plan logic that runs without a GPU: profiles, per-component shapes, the cache key, profile
choice and batch padding, plan-set selection and the manifest. The plans' real build and render are in
tests/export/test_tensorrt.py (marked `tensorrt`, run on a GPU runner)."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest

import engines
from engines import manifest as mf
from engines import plans
from engines.backends import Session

Model = Callable[[str], Path]
TRT, CC = "10.7.0", "9.0"


@pytest.fixture(scope="module")
def sd15(tiny_model: Model) -> mf.Manifest:
    return mf.read(tiny_model("tiny-sd15"))


@pytest.fixture(scope="module")
def sdxl(tiny_model: Model) -> mf.Manifest:
    return mf.read(tiny_model("tiny-sdxl"))


def _copy(tiny_model: Model, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model(name), tmp_path / name))


def _fake_plans(root: Path, manifest: mf.Manifest, profiles: list[mf.Profile], trt: str = TRT,
                cc: str = CC) -> mf.PlanSet:
    """A plan set as the builder would list it, with stand-in plan files (no TensorRT here)."""
    key = plans.plan_key(manifest, profiles, trt, cc)
    refs = {}
    for name in manifest.components:
        path = root / plans.plan_path(key, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"plan {name} {key}".encode())
        refs[name] = mf.file_ref(root, plans.plan_path(key, name))
    return mf.PlanSet(key=key, tensorrt_version=trt, compute_capability=cc, device="Test GPU", profiles=profiles,
                      optimization_level=3, plans=refs)


def _list(root: Path, plan_set: mf.PlanSet) -> mf.Manifest:
    manifest, _ = plans.with_plan_set(mf.read(root, verify=False), plan_set)
    (root / mf.MANIFEST_FILE).write_bytes(mf.encode(manifest))
    return manifest


def _inputs(profile: plans.ShapeProfile) -> dict[str, plans.InputRange]:
    return {r.name: r for r in profile.inputs}


# -- profiles and shapes ---------------------------------------------------------------------------


def test_default_profile_is_the_native_size_static(sd15: mf.Manifest) -> None:
    (profile,) = plans.make_profiles(sd15)
    assert profile == mf.Profile("static", (1, 1, sd15.max_batch), (256, 256, 256), (256, 256, 256))
    assert profile.label == "256x256 b1-4"


def test_sizes_and_dynamic_profiles(sd15: mf.Manifest) -> None:
    profiles = plans.make_profiles(sd15, sizes=[(64, 64), (128, 64), (64, 64)], batch=(1, 2), dynamic=(64, 192))
    assert [p.label for p in profiles] == ["64x64 b1-2", "128x64 b1-2", "dynamic 64-192x64-192 b1-2"]
    assert profiles[2].width == (64, 192, 192)  # opt is the native 256, clamped into the range


@pytest.mark.parametrize(("options", "message"), [
    ({"sizes": [(100, 64)]}, "--sizes 100x64"),
    ({"sizes": [(1024, 1024)]}, "--sizes 1024x1024"),
    ({"batch": (3, 2)}, "--batch 3-2"),
    ({"batch": (0, 2)}, "--batch 0-2"),
    ({"dynamic": (256, 128)}, "--dynamic 256-128"),
    ({"dynamic": (32, 128)}, "--dynamic 32-128"),
])
def test_bad_profile_options_name_the_option(sd15: mf.Manifest, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plans.make_profiles(sd15, **options)


def test_unet_shapes_double_the_batch_for_guidance(sd15: mf.Manifest) -> None:
    profiles = plans.make_profiles(sd15, sizes=[(128, 64)], batch=(1, 4))
    (unet,) = plans.component_profiles(sd15, "unet", profiles)
    shapes = _inputs(unet)
    assert unet.static
    assert shapes["sample"].min == (1, 4, 8, 16) and shapes["sample"].max == (8, 4, 8, 16)  # (B, C, H/8, W/8)
    assert shapes["sample"].opt == (2, 4, 8, 16)  # the default render: one image, guided
    assert shapes["timestep"].min == (1,) and shapes["timestep"].max == (8,)
    hidden = shapes["encoder_hidden_states"]
    assert hidden.min == (1, 77, 32) and hidden.max == (8, 77 * plans.MAX_PROMPT_WINDOWS, 32)


def test_text_encoder_profiles_merge_across_sizes(sdxl: mf.Manifest) -> None:
    profiles = plans.make_profiles(sdxl, sizes=[(64, 64), (128, 128)], dynamic=(64, 256))
    for name in ("text_encoder", "text_encoder_2"):
        (profile,) = plans.component_profiles(sdxl, name, profiles)
        assert _inputs(profile)["input_ids"].max == (2 * plans.MAX_PROMPT_WINDOWS, 77)
    unet = plans.component_profiles(sdxl, "unet", profiles)
    assert [p.static for p in unet] == [True, True, False]
    shapes = _inputs(unet[0])
    images = sdxl.max_batch
    assert shapes["time_ids"].max == (2 * images, 6) and shapes["text_embeds"].min[1] == shapes["text_embeds"].max[1]
    decoder = plans.component_profiles(sdxl, "vae_decoder", profiles)
    assert _inputs(decoder[2])["latent_sample"].max == (images, 4, 32, 32)
    encoder = plans.component_profiles(sdxl, "vae_encoder", profiles)
    assert _inputs(encoder[1])["sample"].max == (images, 3, 128, 128)  # pixels, not latents


class Recorder(Session):
    """Runs the real CPU session and remembers every call's input shapes."""

    def __init__(self, inner: Session, calls: list[tuple[str, dict]]) -> None:
        super().__init__(inner.name, inner.component)
        self.inner, self.calls = inner, calls

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        self.calls.append((self.name, {k: v.shape for k, v in feeds.items()}))
        return self.inner.run(feeds, outputs)


def _render_calls(tiny_model: Model, name: str, **request: object) -> tuple[mf.Manifest, list[tuple[str, dict]]]:
    pipe = engines.load(tiny_model(name), backend="cpu")
    calls: list[tuple[str, dict]] = []
    pipe.sessions = {k: Recorder(s, calls) for k, s in pipe.sessions.items()}
    fields = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "guidance_scale": 5.0,
              "sampler": "euler", "seed": 1} | request
    pipe.render(engines.RenderRequest(**fields))
    return pipe.manifest, calls


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl", "tiny-sd15-inpaint"])
def test_what_the_pipeline_feeds_fits_the_profiles(tiny_model: Model, name: str) -> None:
    """The derived shapes match the pipeline's real calls: guided and not, one image and several,
    text to image and image to image; a size without a profile fits none (ONNX Runtime runs it)."""
    from PIL import Image

    image = Image.new("RGB", (64, 64), (120, 30, 200))
    for request in ({"n": 2}, {"guidance_scale": 1.0}, {"image": image, "strength": 0.5, "n": 3}):
        manifest, calls = _render_calls(tiny_model, name, **request)
        static = plans.make_profiles(manifest, sizes=[(64, 64)], batch=(1, 3))
        other = plans.make_profiles(manifest, sizes=[(128, 128)], batch=(1, 3))
        for component, shapes in calls:
            assert plans.choose_profile(plans.component_profiles(manifest, component, static), shapes) == 0
            fits_other = plans.choose_profile(plans.component_profiles(manifest, component, other), shapes)
            assert (fits_other == 0) == component.startswith("text_encoder"), (component, shapes)


def test_unet_profiles_cover_the_controlnet_residuals(controlnet_model: Model) -> None:
    """A `--controlnet` export's UNet takes residuals at 1/1, 1/2, … of the latent: its profiles give each its
    range, and what the pipeline feeds (zeros without ControlNet) fits them."""
    pipe = engines.load(controlnet_model("tiny-sd15"), backend="cpu")
    calls: list[tuple[str, dict]] = []
    pipe.sessions["unet"].inner = Recorder(pipe.sessions["unet"].inner, calls)  # under the zero residuals
    pipe.render(engines.RenderRequest(prompt="a lighthouse", width=96, height=64, steps=2, guidance_scale=5.0,
                                      sampler="euler", seed=1, n=2))
    profiles = plans.make_profiles(pipe.manifest, sizes=[(96, 64)], batch=(1, 3))
    (unet,) = plans.component_profiles(pipe.manifest, "unet", profiles)
    ranges = {r.name: r for r in unet.inputs}
    assert ranges["down_block_residual.3"].opt[1:] == (64, 4, 6)  # half the latent: 64 px / 8 / 2, 96 px / 8 / 2
    assert len(calls) == 2 and all("mid_block_residual" in shapes for _, shapes in calls)
    for _, shapes in calls:
        assert plans.choose_profile([unet], shapes) == 0


def test_a_static_profile_wins_over_a_dynamic_one(tiny_model: Model) -> None:
    manifest, calls = _render_calls(tiny_model, "tiny-sd15", width=96)
    both = [*plans.make_profiles(manifest, sizes=[(96, 64)], batch=(1, 2), dynamic=(64, 128))]
    dynamic_first = [both[1], both[0]]
    unet_calls = [shapes for component, shapes in calls if component == "unet"]
    for profiles, expected in ((both, 0), (dynamic_first, 1)):
        shaped = plans.component_profiles(manifest, "unet", profiles)
        assert {plans.choose_profile(shaped, s) for s in unet_calls} == {expected}
    dynamic_only = plans.component_profiles(manifest, "unet", [both[1]])
    assert plans.choose_profile(dynamic_only, unet_calls[0]) == 0
    too_long = dict(unet_calls[0], encoder_hidden_states=(2, 77 * (plans.MAX_PROMPT_WINDOWS + 1), 32))
    assert plans.choose_profile(plans.component_profiles(manifest, "unet", both), too_long) is None


def _batch_profile(low: int, opt: int, high: int) -> plans.ShapeProfile:
    return plans.ShapeProfile(True, (plans.InputRange("x", (low, 4), (opt, 4), (high, 4)),))


@pytest.mark.parametrize(("batch", "buckets"), [((1, 2, 8), [1, 2, 4, 8]), ((3, 3, 6), [3, 4, 6]),
                                                ((1, 1, 1), [1])])
def test_batch_buckets(batch: tuple[int, int, int], buckets: list[int]) -> None:
    assert plans.batch_buckets(_batch_profile(*batch)) == buckets


@pytest.mark.parametrize(("rows", "padded"), [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 8), (8, 8),
                                              (14, 16)])
def test_padding_only_when_it_adds_few_rows(rows: int, padded: int) -> None:
    assert plans.padded_batch(rows, _batch_profile(1, 2, 16)) == padded


def test_padding_outside_the_profile_is_an_error() -> None:
    with pytest.raises(ValueError, match="outside"):
        plans.padded_batch(9, _batch_profile(1, 2, 8))


def _feeds(component: mf.Component, axes: dict[str, int]) -> dict[str, np.ndarray]:
    """Distinct values per row, in the shapes the manifest declares (named axes from `axes`)."""
    rng = np.random.default_rng(0)
    return {t.name: rng.standard_normal([d if isinstance(d, int) else axes[d] for d in t.shape]).astype(np.float32)
            for t in component.inputs}


def test_padding_pads_only_the_inputs_whose_first_axis_is_the_batch(lora_model: Model) -> None:
    """7 rows run as 8: the batch inputs get a copy of their last row; LoRA's matrices (whose first axis
    is the rank, or a layer's width) and a scalar timestep are the same for every row and stay as they are."""
    unet = mf.read(lora_model("tiny-sd15")).components["unet"]
    scalar = msgspec.structs.replace(unet, inputs=[msgspec.structs.replace(t, shape=[]) if t.name == "timestep" else t
                                                   for t in unet.inputs])
    axes = {"batch": 7, "height": 8, "width": 8, "sequence": 77, "lora_rank": 2}
    for component in (unet, scalar):
        feeds = _feeds(component, axes)
        batched = plans.batch_inputs(component)
        ranked = [t.name for t in component.inputs if t.shape and t.shape[0] == "lora_rank"]
        assert {"sample", "encoder_hidden_states"} <= batched and ranked and not batched & set(ranked)
        reordered = dict(sorted(feeds.items(), key=lambda item: item[1].ndim))  # a 0-d input first
        assert plans.call_rows(reordered, batched) == 7
        padded = plans.pad_rows(feeds, batched, 8)
        for name, array in feeds.items():
            if name in batched:
                assert padded[name].shape == (8, *array.shape[1:])
                np.testing.assert_array_equal(padded[name][:7], array)
                np.testing.assert_array_equal(padded[name][7], array[6])
            else:
                assert padded[name] is array, name
        assert padded["timestep"].shape == (() if component is scalar else (8,))


# -- the key ---------------------------------------------------------------------------------------


def test_key_changes_with_everything_that_makes_a_plan_valid(sd15: mf.Manifest) -> None:
    profiles = plans.make_profiles(sd15)
    key = plans.plan_key(sd15, profiles, TRT, CC)
    assert key == plans.plan_key(sd15, profiles, TRT, CC) and len(key) == 16
    unet = sd15.components["unet"]
    changed_graph = msgspec.structs.replace(unet, graph=msgspec.structs.replace(unet.graph, sha256="0" * 64))
    variants = {
        "onnx": (msgspec.structs.replace(sd15, components={**sd15.components, "unet": changed_graph}), profiles, TRT,
                 CC),
        "precision": (msgspec.structs.replace(sd15, components={
            **sd15.components, "unet": msgspec.structs.replace(unet, precision="fp16")}), profiles, TRT, CC),
        "profiles": (sd15, plans.make_profiles(sd15, batch=(1, 2)), TRT, CC),
        "sizes": (sd15, plans.make_profiles(sd15, sizes=[(128, 128)]), TRT, CC),
        "dynamic": (sd15, plans.make_profiles(sd15, dynamic=(64, 256)), TRT, CC),
        "tensorrt": (sd15, profiles, "10.8.0", CC),
        "gpu": (sd15, profiles, TRT, "8.9"),
        # the default guidance decides the UNet's opt batch, so it shapes the plan
        "shapes": (msgspec.structs.replace(sd15, defaults=msgspec.structs.replace(sd15.defaults, guidance_scale=0.0)),
                   profiles, TRT, CC),
    }
    keys = {what: plans.plan_key(*args) for what, args in variants.items()}
    assert key not in keys.values()
    assert len(set(keys.values())) == len(keys)


def test_key_ignores_what_does_not_touch_the_plans(sd15: mf.Manifest) -> None:
    profiles = plans.make_profiles(sd15)
    key = plans.plan_key(sd15, profiles, TRT, CC)
    unrelated = msgspec.structs.replace(sd15, defaults=msgspec.structs.replace(sd15.defaults, steps=50),
                                        exporter={"torch": "0"}, tensorrt=[])
    assert plans.plan_key(unrelated, profiles, TRT, CC) == key


# -- manifest and selection ------------------------------------------------------------------------


def test_manifest_round_trips_with_plan_sets(tiny_model: Model, tmp_path: Path) -> None:
    root = _copy(tiny_model, "tiny-sd15", tmp_path)
    manifest = mf.read(root)
    first = _fake_plans(root, manifest, plans.make_profiles(manifest))
    second = _fake_plans(root, manifest, plans.make_profiles(manifest), cc="8.9")
    _list(root, first)
    listed = _list(root, second)
    again = mf.read(root)
    assert again == listed and [s.key for s in again.tensorrt] == [first.key, second.key]
    assert mf.encode(again) == (root / mf.MANIFEST_FILE).read_bytes()


def test_manifest_without_plans_still_loads(tiny_model: Model, tmp_path: Path) -> None:
    """model.json files written before plans existed have no "tensorrt" key: same format, no plans."""
    root = _copy(tiny_model, "tiny-sd15", tmp_path)
    raw = msgspec.json.decode((root / mf.MANIFEST_FILE).read_bytes())
    del raw["tensorrt"]
    (root / mf.MANIFEST_FILE).write_bytes(msgspec.json.encode(raw))
    manifest = mf.read(root)
    assert manifest.tensorrt == [] and manifest.format_version == mf.FORMAT_VERSION
    cpu_backend = "openvino" if importlib.util.find_spec("openvino") else "cpu"
    assert engines.load(root, backend="auto").info.backend == cpu_backend


def test_a_new_build_supersedes_the_set_for_the_same_gpu(sd15: mf.Manifest, tmp_path: Path) -> None:
    old = _fake_plans(tmp_path, sd15, plans.make_profiles(sd15))
    other_gpu = _fake_plans(tmp_path, sd15, plans.make_profiles(sd15), cc="8.6")
    new = _fake_plans(tmp_path, sd15, plans.make_profiles(sd15, batch=(1, 2)))
    manifest, _ = plans.with_plan_set(msgspec.structs.replace(sd15, tensorrt=[old, other_gpu]), new)
    updated, replaced = plans.with_plan_set(manifest, new)  # the same set again: listed once, nothing removed
    assert [s.key for s in updated.tensorrt] == [other_gpu.key, new.key] and replaced == []
    assert plans.with_plan_set(msgspec.structs.replace(sd15, tensorrt=[old, other_gpu]), new)[1] == [old]


def test_select_finds_the_set_for_this_gpu_only(tiny_model: Model, tmp_path: Path) -> None:
    root = _copy(tiny_model, "tiny-sd15", tmp_path)
    manifest = mf.read(root)
    ours = _fake_plans(root, manifest, plans.make_profiles(manifest))
    theirs = _fake_plans(root, manifest, plans.make_profiles(manifest), trt="10.3.0", cc="8.6")
    manifest = _list(root, ours)
    manifest = _list(root, theirs)
    assert plans.select(root, manifest, TRT, CC) == ours
    assert plans.select(root, manifest, "10.3.0", "8.6") == theirs
    for trt, cc in ((TRT, "8.6"), ("10.3.0", CC), ("10.7.1", CC)):
        with pytest.raises(engines.EngineFailure, match="no TensorRT plans for this GPU") as caught:
            plans.select(root, manifest, trt, cc)
        assert "--tensorrt" in str(caught.value)


def test_select_refuses_stale_or_damaged_plans(tiny_model: Model, tmp_path: Path) -> None:
    root = _copy(tiny_model, "tiny-sd15", tmp_path)
    manifest = _list(root, _fake_plans(root, mf.read(root), plans.make_profiles(mf.read(root))))
    plan_set = manifest.tensorrt[0]
    unet = manifest.components["unet"]
    regraphed = msgspec.structs.replace(manifest, components={
        **manifest.components, "unet": msgspec.structs.replace(unet, precision="fp16")})
    with pytest.raises(engines.EngineFailure, match="no longer match"):
        plans.select(root, regraphed, TRT, CC)
    plan_file = root / plan_set.plans["unet"].path
    plan_file.write_bytes(plan_file.read_bytes().upper())  # same size, other bytes
    assert plans.select(root, manifest, TRT, CC, verify=False) == plan_set
    with pytest.raises(engines.EngineFailure, match="sha256"):
        plans.select(root, manifest, TRT, CC)
    plan_file.unlink()
    with pytest.raises(engines.EngineFailure, match="missing"):
        plans.select(root, manifest, TRT, CC, verify=False)


# -- the backend without TensorRT ------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_auto_falls_back_to_onnx_runtime_with_a_clear_line(tiny_model: Model, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    root = _copy(tiny_model, "tiny-sd15", tmp_path)
    _list(root, _fake_plans(root, mf.read(root), plans.make_profiles(mf.read(root))))
    with caplog.at_level(logging.WARNING, logger="sdserve.engines"):
        pipe = engines.load(root, backend="auto")
    # on to the CPU: OpenVINO where that package is installed, else ONNX Runtime
    assert pipe.info.backend == ("openvino" if importlib.util.find_spec("openvino") else "cpu")
    lines = [r.getMessage() for r in caplog.records if "backend tensorrt is not usable" in r.getMessage()]
    assert len(lines) == 1 and "TensorRT" in lines[0], caplog.text
    with pytest.raises(engines.EngineFailure, match="TensorRT is not installed"):
        engines.load(root, backend="tensorrt")
