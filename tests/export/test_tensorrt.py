"""`python -m export PRESET --tensorrt`: the one-line failure where TensorRT is absent (here, CI), the
decisions taken before any build (with the GPU probe stubbed), and, marked `tensorrt`, real plan builds
and renders compared with ONNX Runtime on CPU, which a GPU runner with TensorRT executes."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

import engines
from engines import gpu, plans
from engines import manifest as mf
from export import ExportError, ExportSettings, export_model
from export import tensorrt as trt_export

ROOT = Path(__file__).resolve().parents[2]
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
FAKE_GPU = gpu.Gpu(name="Test GPU", compute_capability="9.0", tensorrt_version="10.7.0", total_memory=80 << 30)


def _tensorrt_runs() -> bool:
    try:
        gpu.probe()
    except engines.EngineError:
        return False
    return True


needs_tensorrt = pytest.mark.skipif(not HAS_TENSORRT or not _tensorrt_runs(), reason="needs TensorRT and a GPU")


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "export", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def _errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("export: error:")]


@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("fp16") / "tiny-sd15"
    export_model(ExportSettings(preset="tiny-sd15", precision="fp16", output=str(target)))
    return target


@pytest.fixture
def model(fp16_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fp16_model, tmp_path / "tiny-sd15"))


@pytest.fixture
def stub_gpu(monkeypatch: pytest.MonkeyPatch) -> gpu.Gpu:
    monkeypatch.setattr(gpu, "probe", lambda device_id=0: FAKE_GPU)
    return FAKE_GPU


# -- without TensorRT ------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_cli_without_tensorrt_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    result = _run_cli("tiny-sd15", "--tensorrt", "--output", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    errors = _errors(result)
    assert len(errors) == 1 and "TensorRT is not installed" in errors[0], result.stderr
    assert list(tmp_path.iterdir()) == []  # checked before exporting anything


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_cli_plans_for_an_existing_model_without_tensorrt(model: Path) -> None:
    before = (model / mf.MANIFEST_FILE).read_bytes()
    result = _run_cli("tiny-sd15", "--tensorrt", "--sizes", "64x64", "--output", str(model))
    assert result.returncode == 2 and len(_errors(result)) == 1, result.stderr
    assert (model / mf.MANIFEST_FILE).read_bytes() == before
    assert not (model / plans.PLANS_DIR).exists()


@pytest.mark.parametrize("args", [["--sizes", "64by64"], ["--batch", "one-four"], ["--opt-level", "7"]])
def test_cli_rejects_malformed_plan_options(tmp_path: Path, args: list[str]) -> None:
    result = _run_cli("tiny-sd15", "--tensorrt", *args, "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "usage:" in result.stderr
    assert list(tmp_path.iterdir()) == []


# -- decisions before any build (GPU probe stubbed) ------------------------------------------------


def test_existing_model_gets_plans_without_export(model: Path, stub_gpu: gpu.Gpu) -> None:
    assert trt_export.needs_export(ExportSettings(preset="tiny-sd15", output=str(model))) is False
    assert trt_export.needs_export(ExportSettings(preset="tiny-sd15", output=str(model), force=True,
                                                  precision="fp16")) is True
    assert trt_export.needs_export(ExportSettings(preset="tiny-sd15", output=str(model.parent / "new"),
                                                  precision="fp16")) is True


@pytest.mark.parametrize(("settings", "message"), [
    ({"model": "./checkpoint"}, "drop --model"),
    ({"preset": "tiny-sdxl"}, "holds tiny-sd15, not tiny-sdxl"),
    ({"output": "{new}", "precision": "fp32"}, "drop --precision fp32"),
])
def test_contradictory_requests_fail_before_work(model: Path, stub_gpu: gpu.Gpu, settings: dict,
                                                 message: str) -> None:
    fields = {"preset": "tiny-sd15", "output": str(model)} | settings
    fields["output"] = fields["output"].replace("{new}", str(model.parent / "new"))
    with pytest.raises(ExportError, match=message):
        trt_export.needs_export(ExportSettings(**fields))


def test_fp32_models_are_refused_with_the_fix(tiny_model, tmp_path: Path, stub_gpu: gpu.Gpu) -> None:
    root = Path(shutil.copytree(tiny_model("tiny-sd15"), tmp_path / "fp32"))
    with pytest.raises(ExportError, match="--precision fp16 --force"):
        trt_export.build_plans(trt_export.PlanSettings(model_dir=str(root)))


def test_bad_profiles_are_an_export_error(model: Path, stub_gpu: gpu.Gpu) -> None:
    with pytest.raises(ExportError, match="--sizes 1000x1000"):
        trt_export.build_plans(trt_export.PlanSettings(model_dir=str(model), sizes=[(1000, 1000)]))


class StubBuilder:
    """Stands in for TensorRT's builder: writes a small plan per component, or fails on `fail`."""

    built: ClassVar[list[str]] = []
    fail: ClassVar[str | None] = None

    def __init__(self, root: Path, manifest: mf.Manifest, profiles: list[mf.Profile], device: gpu.Gpu,
                 level: int) -> None:
        self.profiles = profiles

    def build(self, name: str, stage: Path, relative: str) -> tuple[mf.FileRef, trt_export.PlanReport]:
        if name == StubBuilder.fail:
            raise ExportError(f"{name}: TensorRT could not build a plan for the profiles #0 {self.profiles[0].label}")
        data = f"plan {name} {relative}".encode()
        (stage / Path(relative).name).write_bytes(data)
        StubBuilder.built.append(name)
        return mf.FileRef(relative, hashlib.sha256(data).hexdigest(), len(data)), trt_export.PlanReport(
            name, len(data), 0.0)


@pytest.fixture
def stub_builder(monkeypatch: pytest.MonkeyPatch, stub_gpu: gpu.Gpu) -> type[StubBuilder]:
    monkeypatch.setattr(trt_export, "_Builder", StubBuilder)
    monkeypatch.setattr(StubBuilder, "built", [])
    monkeypatch.setattr(StubBuilder, "fail", None)
    return StubBuilder


def _build(model: Path, sizes: list[tuple[int, int]]) -> trt_export.PlanSetReport:
    return trt_export.build_plans(trt_export.PlanSettings(model_dir=str(model), sizes=sizes, batch=(1, 2)))


def test_plans_are_listed_and_a_valid_build_is_skipped(model: Path, stub_builder: type[StubBuilder]) -> None:
    report = _build(model, [(64, 64)])
    components = set(mf.read(model).components)
    assert report.built and set(stub_builder.built) == components
    manifest = mf.read(model)  # verifies every ONNX file again: the model itself is untouched
    (plan_set,) = manifest.tensorrt
    assert plan_set.key == report.key and set(plan_set.plans) == components
    assert plans.select(model, manifest, FAKE_GPU.tensorrt_version, FAKE_GPU.compute_capability) == plan_set
    assert sorted(p.name for p in (model / plans.PLANS_DIR).iterdir()) == [report.key]  # no staging left
    stub_builder.built.clear()
    again = _build(model, [(64, 64)])
    assert again.built is False and again.key == report.key and stub_builder.built == []
    (model / plans.plan_path(report.key, "unet")).write_bytes(b"damaged")
    assert _build(model, [(64, 64)]).built and set(stub_builder.built) == components


def test_another_optimization_level_builds_again(model: Path, stub_builder: type[StubBuilder]) -> None:
    first = _build(model, [(64, 64)])
    again = trt_export.build_plans(trt_export.PlanSettings(model_dir=str(model), sizes=[(64, 64)], batch=(1, 2),
                                                           optimization_level=5))
    assert again.built and again.key == first.key  # the level is not part of validity, but was asked for
    (plan_set,) = mf.read(model).tensorrt
    assert plan_set.optimization_level == 5


def test_other_profiles_supersede_the_plans_for_this_gpu(model: Path, stub_builder: type[StubBuilder]) -> None:
    old = _build(model, [(64, 64)])
    new = _build(model, [(64, 64), (128, 64)])
    (plan_set,) = mf.read(model).tensorrt
    assert plan_set.key == new.key != old.key
    assert not (model / plans.PLANS_DIR / old.key).exists()
    assert [p.label for p in plan_set.profiles] == ["64x64 b1-2", "128x64 b1-2"]


def test_a_failed_build_lists_nothing_and_leaves_nothing(model: Path, stub_builder: type[StubBuilder]) -> None:
    before = (model / mf.MANIFEST_FILE).read_bytes()
    stub_builder.fail = "unet"
    with pytest.raises(ExportError, match="unet: TensorRT could not build"):
        _build(model, [(64, 64)])
    assert (model / mf.MANIFEST_FILE).read_bytes() == before
    assert list((model / plans.PLANS_DIR).iterdir()) == []  # the half-built set was removed


# -- on a GPU with TensorRT ------------------------------------------------------------------------


def _request(width: int, height: int, **overrides: object) -> engines.RenderRequest:
    fields = {"prompt": "a lighthouse at dusk", "negative_prompt": "fog", "width": width, "height": height,
              "steps": 3, "guidance_scale": 5.0, "sampler": "euler", "seed": 11, "n": 2} | overrides
    return engines.RenderRequest(**fields)


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
def test_build_plans_then_render_like_onnx_runtime(model: Path) -> None:
    settings = trt_export.PlanSettings(model_dir=str(model), sizes=[(64, 64)], batch=(1, 2), dynamic=(64, 128),
                                       optimization_level=0)
    report = trt_export.build_plans(settings)
    assert report.built and {c.name for c in report.components} == set(mf.read(model).components)
    (plan_set,) = mf.read(model).tensorrt
    assert plan_set.key == report.key and all((model / ref.path).is_file() for ref in plan_set.plans.values())
    assert list((model / plans.PLANS_DIR).glob("timing-*.cache"))
    assert trt_export.build_plans(settings).built is False

    on_trt = engines.load(model, backend="tensorrt")
    assert on_trt.info.backend == "tensorrt"
    assert engines.load(model, backend="auto").info.backend == "tensorrt"
    on_cpu = engines.load(model, backend="cpu")
    # static profile (CUDA graphs), the dynamic one, and a size without plans (ONNX Runtime fallback)
    for width, height in ((64, 64), (96, 64), (256, 256)):
        expected = on_cpu.render(_request(width, height)).pixels
        got = on_trt.render(_request(width, height)).pixels
        assert np.abs(got - expected).max() < 0.05, (width, height)
    first, replayed = (on_trt.render(_request(64, 64, n=1, guidance_scale=1.0)).pixels for _ in range(2))
    np.testing.assert_array_equal(first, replayed)  # a replayed CUDA graph computes what the first run did


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
def test_cli_rebuild_with_other_profiles_supersedes_the_old_plans(model: Path) -> None:
    first = _run_cli("tiny-sd15", "--tensorrt", "--output", str(model), "--sizes", "64x64", "--opt-level", "0")
    assert first.returncode == 0 and "built TensorRT plans" in first.stdout, first.stderr
    assert "[2/4] unet: building a TensorRT plan" in first.stderr
    (old,) = mf.read(model).tensorrt
    second = _run_cli("tiny-sd15", "--tensorrt", "--output", str(model), "--sizes", "64x64,128x64", "--opt-level", "0")
    assert second.returncode == 0, second.stderr
    (new,) = mf.read(model).tensorrt
    assert new.key != old.key and not (model / plans.PLANS_DIR / old.key).exists()



@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
def test_a_padded_batch_matches_onnx_runtime(model: Path) -> None:
    from engines.backends.ort import OrtBackend
    from engines.backends.tensorrt import TensorRtBackend

    trt_export.build_plans(trt_export.PlanSettings(model_dir=str(model), sizes=[(64, 64)], batch=(1, 4),
                                                   optimization_level=0))
    manifest = mf.read(model)
    unet = manifest.components["unet"]
    (profile,) = plans.component_profiles(manifest, "unet", manifest.tensorrt[0].profiles)
    assert plans.padded_batch(7, profile) == 8  # 7 rows run as 8, the 8th dropped
    rng = np.random.default_rng(0)
    hidden = unet.inputs[2].shape[2]
    feeds = {"sample": rng.standard_normal((7, 4, 8, 8)), "timestep": np.linspace(50, 950, 7),
             "encoder_hidden_states": rng.standard_normal((7, 77, hidden))}
    session = TensorRtBackend(model, manifest).open("unet", unet)
    try:
        got = session.run(feeds, ["out_sample"])["out_sample"]
    finally:
        session.close()
    expected = OrtBackend(model, "cpu", manifest).open("unet", unet).run(feeds, ["out_sample"])["out_sample"]
    assert got.shape == expected.shape == (7, 4, 8, 8) and got.dtype == np.float32
    assert np.abs(got - expected).max() < 0.05


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
def test_batched_renders_on_plans_split_at_the_profiles_rows(model: Path) -> None:
    """Step-level batching on TensorRT: calls above the plans' largest batch (2 images, 4 rows) are split
    and stay on the plans; each image is the image rendered alone, within fp16 noise."""
    from tests.engines import batches

    trt_export.build_plans(trt_export.PlanSettings(model_dir=str(model), sizes=[(64, 64)], batch=(1, 2),
                                                   optimization_level=0))
    pipeline = engines.load(model, backend="tensorrt")
    assert pipeline.unet_rows == 4
    rows: list[int] = []
    unet, run = pipeline.sessions["unet"], pipeline.sessions["unet"].run
    unet.run = lambda feeds, outputs: rows.append(feeds["sample"].shape[0]) or run(feeds, outputs)
    mix = [_request(64, 64, n=1, seed=s, sampler=sampler) for s, sampler in ((1, "euler"), (2, "euler_a"), (3, "ddim"))]
    renderings, _ = batches.run(pipeline, [(0, lambda r=r: pipeline.begin(r)) for r in mix])
    assert rows and max(rows) <= 4 and sum(rows[:2]) == 6  # 6 rows per step: 4 + 2
    for rendering, alone in zip(renderings, mix, strict=True):
        assert np.abs(rendering.result().pixels - pipeline.render(alone).pixels).max() < 0.02


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
def test_a_padded_lora_batch_keeps_its_rank_shaped_inputs(tmp_path: Path) -> None:
    """7 rows run as 8 on a LoRA-capable UNet: only the batch inputs are padded; the LoRA matrices (a 1×1
    convolution's `down` is (rank, in, 1, 1)) keep their shapes, and the result is ONNX Runtime's."""
    from engines.backends.ort import OrtBackend
    from engines.backends.tensorrt import TensorRtBackend

    root = tmp_path / "tiny-sd15-lora"
    export_model(ExportSettings(preset="tiny-sd15", precision="fp16", output=str(root), lora_rank=8))
    trt_export.build_plans(trt_export.PlanSettings(model_dir=str(root), sizes=[(64, 64)], batch=(1, 4),
                                                   optimization_level=0))
    manifest = mf.read(root)
    unet = manifest.components["unet"]
    (profile,) = plans.component_profiles(manifest, "unet", manifest.tensorrt[0].profiles)
    assert plans.padded_batch(7, profile) == 8
    rng = np.random.default_rng(0)
    axes = {"batch": 7, "height": 8, "width": 8, "sequence": 77, "lora_rank": 2}
    feeds = {t.name: rng.standard_normal([d if isinstance(d, int) else axes[d] for d in t.shape])
             * (0.05 if "lora" in t.name else 1.0) for t in unet.inputs}
    feeds["timestep"] = np.linspace(50, 950, 7)
    session = TensorRtBackend(root, manifest).open("unet", unet)
    try:
        got = session.run(feeds, ["out_sample"])["out_sample"]
    finally:
        session.close()
    assert session.ran_on == {"TensorRT plan": 1}
    expected = OrtBackend(root, "cpu", manifest).open("unet", unet).run(feeds, ["out_sample"])["out_sample"]
    assert got.shape == expected.shape == (7, 4, 8, 8)
    assert np.abs(got - expected).max() < 0.05


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
def test_a_failed_cuda_graph_capture_ends_capture_and_the_call_still_answers(model: Path) -> None:
    """A run that fails while being captured must end the capture (else every later call on the stream
    fails), free what was captured and turn graphs off; the call's outputs come from the plain run."""
    from engines.backends.ort import OrtBackend
    from engines.backends.tensorrt import TensorRtBackend

    trt_export.build_plans(trt_export.PlanSettings(model_dir=str(model), sizes=[(64, 64)], batch=(1, 2),
                                                   optimization_level=0))
    manifest = mf.read(model)
    unet, cuda = manifest.components["unet"], gpu.cudart()
    capturing = cuda.cudaStreamCaptureStatus.cudaStreamCaptureStatusActive

    class RefusingCapture:  # TensorRT's context, except that it raises when its stream is being captured
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def execute_async_v3(self, stream: int) -> bool:
            if cuda.cudaStreamIsCapturing(stream)[1] == capturing:
                raise RuntimeError("refused under capture")
            return self.inner.execute_async_v3(stream)

    rng = np.random.default_rng(0)
    hidden = unet.inputs[2].shape[2]
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8)), "timestep": np.array([500.0, 500.0]),
             "encoder_hidden_states": rng.standard_normal((2, 77, hidden))}
    session = TensorRtBackend(model, manifest).open("unet", unet)
    try:
        session._context = RefusingCapture(session._context)
        first = session.run(feeds, ["out_sample"])["out_sample"]  # a plain run, then the capture fails
        assert not session._graphs_work and session._graphs == {next(iter(session._graphs)): None}
        assert cuda.cudaStreamIsCapturing(session._stream)[1] != capturing
        second = session.run(feeds, ["out_sample"])["out_sample"]
    finally:
        session.close()
    np.testing.assert_array_equal(first, second)
    expected = OrtBackend(model, "cpu", manifest).open("unet", unet).run(feeds, ["out_sample"])["out_sample"]
    assert np.abs(first - expected).max() < 0.05


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
def test_doctor_renders_tensorrt_on_its_plans(model: Path) -> None:
    """Plans for 64x64 only: the doctor renders there, and says every component ran on its plan (at the
    model's smallest size a render could pass on the ONNX Runtime fallback)."""
    import json

    trt_export.build_plans(trt_export.PlanSettings(model_dir=str(model), sizes=[(64, 64)], batch=(1, 2),
                                                   optimization_level=0))
    done = subprocess.run([sys.executable, "-m", "engines", "doctor", str(model), "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    render = checks["render tensorrt"]
    assert render["status"] == "ok", render
    assert render["detail"].startswith("64x64") and "on TensorRT plan" in render["detail"]
    assert "fallback" not in render["detail"]
