"""Choosing backends and building their options, checked without a GPU; the GPU halves are marked."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import onnxruntime
import pytest

import engines
from engines import libraries, plans
from engines import manifest as mf
from engines.backends import auto_order, ort
from tests.engines.test_tensorrt_plans import _copy, _fake_plans, _list

Model = Callable[[str], Path]
ROOT = Path(__file__).resolve().parents[2]


def _with_plans(manifest: mf.Manifest, root: Path) -> mf.Manifest:
    return _list(root, _fake_plans(root, manifest, plans.make_profiles(manifest)))


def test_auto_prefers_cuda_unless_tensorrt_profiles_exist(tiny_model: Model, tmp_path: Path) -> None:
    root = _copy(tiny_model, "tiny-sd15", tmp_path)
    built = ["tensorrt-ep", "cuda", "cpu"]
    plain = mf.read(root)
    assert auto_order(plain, built) == ["cuda", "cpu"]
    assert auto_order(plain, ["cpu"]) == ["cpu"]
    assert auto_order(_with_plans(plain, root), built) == ["tensorrt", "tensorrt-ep", "cuda", "cpu"]


def test_tensorrt_ep_options_follow_each_components_precision(tiny_model: Model, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    manifest = mf.read(tiny_model("tiny-sd15"))
    # as an fp16 export writes it: fp16 UNet and text encoder, fp32 VAE
    components = {k: c if k.startswith("vae_") else mf.Component(c.graph, "fp16", c.inputs, c.outputs)
                  for k, c in manifest.components.items()}
    backend = ort.OrtBackend(tmp_path, "tensorrt-ep", manifest)
    for key, component in components.items():
        options = backend.tensorrt_options(key, component)
        assert options["trt_fp16_enable"] is (not key.startswith("vae_")), key
        cache = Path(str(options["trt_engine_cache_path"]))
        assert cache.is_relative_to(tmp_path / "cache") and not cache.is_relative_to(tiny_model("tiny-sd15"))
        assert "trt_load_user_initializer" not in options  # small graphs keep their weights inline


def test_tensorrt_ep_profiles_are_the_native_plans_shapes(tiny_model: Model, tmp_path: Path) -> None:
    manifest = mf.read(tiny_model("tiny-sd15"))
    options = ort.OrtBackend(tmp_path, "tensorrt-ep", manifest).tensorrt_options("unet", manifest.components["unet"])
    h, w = manifest.defaults.height // 8, manifest.defaults.width // 8
    hidden = manifest.components["unet"].inputs[2].shape[2]
    # batch: one image unguided up to max_batch guided pairs; prompt windows of 77 tokens, up to 3
    assert options["trt_profile_min_shapes"] == f"sample:1x4x{h}x{w},timestep:1,encoder_hidden_states:1x77x{hidden}"
    assert options["trt_profile_opt_shapes"] == f"sample:2x4x{h}x{w},timestep:2,encoder_hidden_states:2x77x{hidden}"
    top = 2 * manifest.max_batch
    assert options["trt_profile_max_shapes"] == (f"sample:{top}x4x{h}x{w},timestep:{top},"
                                                 f"encoder_hidden_states:{top}x{77 * 3}x{hidden}")


def test_tensorrt_ep_cache_is_created_with_its_parents(tiny_model: Model, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fresh host ~/.cache/sdserve/tensorrt-ep does not exist; the EP creates only the last level of
    its cache path and throws otherwise (ONNX Runtime then falls back to CUDA, and the session is refused)."""
    monkeypatch.setenv("SDSERVE_CACHE_DIR", str(tmp_path / "fresh" / "cache" / "sdserve"))
    manifest = mf.read(tiny_model("tiny-sd15"))
    backend = ort.OrtBackend(tmp_path, "tensorrt-ep", manifest)
    cache = Path(str(backend.tensorrt_options("unet", manifest.components["unet"])["trt_engine_cache_path"]))
    assert cache.is_dir() and cache.is_relative_to(tmp_path / "fresh" / "cache" / "sdserve" / "tensorrt-ep")
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("SDSERVE_CACHE_DIR", str(tmp_path / "file" / "cache"))
    with pytest.raises(engines.EngineFailure, match=r"SDSERVE_CACHE_DIR"):
        backend.tensorrt_options("unet", manifest.components["unet"])


def test_tensorrt_ep_profiles_leave_out_a_scalar_input(tiny_model: Model, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """optimum's UNet takes one timestep for the whole batch (shape []). "timestep:" is no shape to the EP:
    it rejects the option and drops every profile, with a warning our log level hides."""
    monkeypatch.setenv("SDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    manifest = mf.read(tiny_model("tiny-sd15"))
    unet = manifest.components["unet"]
    scalar = msgspec.structs.replace(unet, inputs=[msgspec.structs.replace(t, shape=[]) if t.name == "timestep" else t
                                                   for t in unet.inputs])
    manifest = msgspec.structs.replace(manifest, components={**manifest.components, "unet": scalar})
    options = ort.OrtBackend(tmp_path, "tensorrt-ep", manifest).tensorrt_options("unet", scalar)
    for bound in ("min", "opt", "max"):
        entries = str(options[f"trt_profile_{bound}_shapes"]).split(",")
        assert [e.split(":")[0] for e in entries] == ["sample", "encoder_hidden_states"], entries
        assert all(re.fullmatch(r"[\w.]+:\d+(x\d+)*", e) for e in entries), entries  # the EP's own format


def test_sessions_never_switch_provider_behind_our_back(tiny_model: Model) -> None:
    """ONNX Runtime's wrapper retries a session whose provider failed (EPFail) on the next providers, for
    good, with only a print; sdserve turns that failure into an EngineFailure instead, so its sessions run
    with the wrapper's fallback off (only a GPU can raise EPFail: tests marked gpu show the behaviour)."""
    root = tiny_model("tiny-sd15")
    manifest = mf.read(root)
    session = ort.OrtBackend(root, "cpu", manifest).open("text_encoder", manifest.components["text_encoder"])
    assert session._session._enable_fallback is False  # what InferenceSession.disable_fallback() sets


def test_the_tensorrt_provider_library_names_its_tensorrt(tmp_path: Path) -> None:
    library = tmp_path / libraries.TENSORRT_PROVIDER_LIBRARY
    library.write_bytes(b"\x7fELF\0\0libcudart.so.13\0libnvinfer.so.10\0libnvonnxparser.so.10\0")
    assert libraries.linked_tensorrt_major(library) == 10
    assert libraries.linked_tensorrt_major(tmp_path / "absent.so") is None


@pytest.mark.skipif(libraries.linked_tensorrt_major() is not None, reason="this onnxruntime has the TensorRT EP")
def test_tensorrt_ep_without_the_provider_is_one_clear_failure(tiny_model: Model) -> None:
    with pytest.raises(engines.EngineFailure, match="no TensorRT execution provider"):
        engines.load(tiny_model("tiny-sd15"), backend="tensorrt-ep")


def test_any_exception_while_loading_a_backend_is_an_engine_failure(tiny_model: Model, tmp_path: Path) -> None:
    """A TensorRT whose libraries fail to load raises OSError, not ImportError: "auto" must still fall
    back to ONNX Runtime and an explicit backend must fail as EngineFailure (the server maps that)."""
    root = _copy(tiny_model, "tiny-sd15", tmp_path)
    _with_plans(mf.read(root), root)
    fake = tmp_path / "site" / "tensorrt"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise OSError('libnvinfer.so.11: cannot open shared object file')\n")
    script = (
        "import sys; sys.path.insert(0, sys.argv[2]); import engines\n"
        "print(engines.load(sys.argv[1], backend='auto').info.backend)\n"
        "try:\n    engines.load(sys.argv[1], backend='tensorrt')\n"
        "except engines.EngineFailure as exc:\n    print('EngineFailure', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(root), str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # auto moves on to the CPU: OpenVINO where that package is installed, else ONNX Runtime
    assert lines[0] == ("openvino" if importlib.util.find_spec("openvino") else "cpu")
    assert lines[1].startswith("EngineFailure") and "OSError" in lines[1] and "libnvinfer" in lines[1]


# -- on a GPU (the gpu-bench workflow) -------------------------------------------------------------

def _cuda_runs() -> bool:
    return "CUDAExecutionProvider" in ort.ort.get_available_providers() and os.path.exists("/dev/nvidiactl")


needs_cuda = pytest.mark.skipif(not _cuda_runs(), reason="needs onnxruntime-gpu and an NVIDIA GPU")


@pytest.mark.gpu
@needs_cuda
def test_cuda_loads_without_torch_imported(tiny_model: Model) -> None:
    """The server never imports torch: the CUDA libraries must come from preload_dlls."""
    script = ("import sys, engines; pipe = engines.load(sys.argv[1], backend='cuda'); "
              "assert 'torch' not in sys.modules; print(pipe.info.backend)")
    done = subprocess.run([sys.executable, "-c", script, str(tiny_model("tiny-sd15"))], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["cuda"], done.stderr


def _ep_runs() -> bool:
    return _cuda_runs() and libraries.ep_unavailable(libraries.tensorrt_stack()) is None


needs_tensorrt_ep = pytest.mark.skipif(not _ep_runs(), reason="needs a GPU and the TensorRT the EP links (the "
                                       "tensorrt-ep extra, in an environment without the tensorrt extra)")


def _export_fp16(preset: str, target: Path) -> Path:
    from export import ExportSettings, export_model

    export_model(ExportSettings(preset=preset, precision="fp16", output=str(target)))
    return target


def _unet_768(manifest: mf.Manifest) -> dict[str, np.ndarray]:
    """A guided UNet call at SD 2.x's native 768², at the last timestep, with the activations' real scale."""
    rng = np.random.default_rng(0)
    hidden = manifest.components["unet"].inputs[2].shape[2]
    return {"sample": rng.standard_normal((2, 4, 96, 96)) * 14.6, "timestep": np.array([999.0, 999.0]),
            "encoder_hidden_states": rng.standard_normal((2, 77, hidden)) * 4}


@pytest.mark.gpu
@needs_cuda
def test_fp16_sd2_unet_is_finite_at_768_on_cuda(tmp_path: Path) -> None:
    root = _export_fp16("tiny-sd21", tmp_path / "tiny-sd21-fp16")
    manifest = mf.read(root)
    session = ort.OrtBackend(root, "cuda", manifest).open("unet", manifest.components["unet"])
    out = session.run(_unet_768(manifest), ["out_sample"])["out_sample"]
    assert np.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_tensorrt_ep
def test_fp16_sd2_unet_at_768_on_tensorrt_ep_is_finite_and_close_to_cuda(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT 10, which the EP links, is weakly typed: with trt_fp16_enable its builder may run the parts
    export/precision.py keeps in fp32 (the timestep sinusoid, SD 2.x's attention scores) in fp16, giving
    noise or NaN. Which kernels it picks only a GPU's build shows. The CUDA EP runs the graph as typed."""
    monkeypatch.setenv("SDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    root = _export_fp16("tiny-sd21", tmp_path / "tiny-sd21-fp16")
    manifest = mf.read(root)
    unet, feeds = manifest.components["unet"], _unet_768(manifest)
    size = (768, 768, 768)  # beyond the tiny model's sizes, so the profile is written out, not made
    on_ep = ort.OrtBackend(root, "tensorrt-ep", manifest, profiles=[mf.Profile("static", (1, 1, 1), size, size)])
    session = on_ep.open("unet", unet)
    got = session.run(feeds, ["out_sample"])["out_sample"]
    assert session.ran_on == {"ONNX Runtime [Tensorrt, CUDA, CPU]": 1}  # on the EP, no fallback
    expected = ort.OrtBackend(root, "cuda", manifest).open("unet", unet).run(feeds, ["out_sample"])["out_sample"]
    assert np.isfinite(got).all()
    relative = float(np.abs(got - expected).mean() / np.abs(expected).mean())
    assert relative < 0.05, f"tensorrt-ep differs from the CUDA EP by {relative:.3g} (mean, relative)"


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_tensorrt_ep
def test_tensorrt_ep_loads_on_a_fresh_host_and_never_moves_to_cuda(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """No ~/.cache/sdserve yet: the EP's cache folder is made with its parents, the model loads on the EP,
    and a call the EP fails (more rows than its profiles) is an EngineFailure, never a silent switch of
    the session to CUDA (ONNX Runtime's wrapper fallback)."""
    monkeypatch.setenv("SDSERVE_CACHE_DIR", str(tmp_path / "fresh" / "home" / ".cache" / "sdserve"))
    root = _export_fp16("tiny-sd15", tmp_path / "tiny-sd15-fp16")
    pipe = engines.load(root, backend="tensorrt-ep")
    assert pipe.info.backend == "tensorrt-ep"
    native = pipe.manifest.defaults
    pipe.render(engines.RenderRequest(prompt="a cube", width=native.width, height=native.height, steps=2, seed=1))
    unet = pipe.sessions["unet"]
    assert set(unet.ran_on) == {"ONNX Runtime [Tensorrt, CUDA, CPU]"}
    rows = unet.max_rows + 1
    hidden = unet.component.inputs[2].shape[2]
    feeds = {"sample": np.zeros((rows, 4, native.height // 8, native.width // 8)), "timestep": np.full(rows, 500.0),
             "encoder_hidden_states": np.zeros((rows, 77, hidden))}
    with contextlib.suppress(engines.EngineFailure):  # the EP may also build an engine for the new shape
        unet.run(feeds, ["out_sample"])
    assert unet._session.get_providers()[0] == "TensorrtExecutionProvider"


def test_cpu_session_options_keep_one_copy_of_the_weights(tmp_path: Path, tiny_model: Model) -> None:
    """CPU sessions run without an arena (each run's activations go back to the system); the components
    run once per image keep no pre-packed or reordered copy of their weights, the UNet keeps both (README,
    Performance); and a model still renders the same after a second one loads."""
    manifest = mf.read(tiny_model("tiny-sd15"))
    backend = ort.OrtBackend(tmp_path, "cpu", manifest)
    unet, decoder = backend.session_options("unet"), backend.session_options("vae_decoder")
    assert not unet.enable_cpu_mem_arena and not decoder.enable_cpu_mem_arena
    assert unet.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    with pytest.raises(RuntimeError):  # not configured: ONNX Runtime pre-packs
        unet.get_session_config_entry("session.disable_prepacking")
    for name in ("text_encoder", "vae_encoder", "vae_decoder"):
        options = backend.session_options(name)
        assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        assert options.get_session_config_entry("session.disable_prepacking") == "1"
    request = engines.RenderRequest(prompt="a cube", width=64, height=64, steps=2, seed=3)
    first = engines.load(tiny_model("tiny-sd15"), backend="cpu").render(request).pixels
    engines.load(tiny_model("tiny-sd21"), backend="cpu")
    assert np.array_equal(engines.load(tiny_model("tiny-sd15"), backend="cpu").render(request).pixels, first)
