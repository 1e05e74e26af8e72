"""Export: every tiny preset to a model directory that ONNX Runtime loads and that matches PyTorch."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engines import manifest as mf
from export import ExportError, ExportSettings, export_model, presets, tiny
from export.exporter import component_graphs
from export.graphs import Shape
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]


def _run_cli(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "export", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, **kwargs)


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if name in p.name]


@pytest.mark.parametrize("name", TINY)
def test_tiny_export_is_a_valid_model_directory(tiny_model: Callable[[str], Path], name: str) -> None:
    folder = tiny_model(name)
    manifest = mf.read(folder, verify=True)  # every named file present, sizes and sha256 match
    assert manifest.name == name
    expected = {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    if manifest.family == "sdxl":
        expected.add("text_encoder_2")
    assert set(manifest.components) == expected
    for component in manifest.components.values():
        path = folder / component.graph.path
        onnx.checker.check_model(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == [t.name for t in component.inputs]
        assert [o.name for o in session.get_outputs()] == [t.name for t in component.outputs]
    for tokenizer in manifest.tokenizers.values():
        assert (folder / tokenizer.file.path).is_file()
    assert (folder / "model_index.json").is_file()
    assert (folder / "scheduler" / "scheduler_config.json").is_file()
    assert manifest.unet_in_channels == (9 if name.endswith("inpaint") else 4)
    assert manifest.prediction_type == ("v_prediction" if name == "tiny-sd21" else "epsilon")


@pytest.mark.parametrize("name", TINY)
def test_manifest_round_trips(tiny_model: Callable[[str], Path], name: str) -> None:
    raw = (tiny_model(name) / mf.MANIFEST_FILE).read_bytes()
    decoded = msgspec.json.decode(raw, type=mf.Manifest)
    assert mf.encode(decoded) == raw


@pytest.mark.parametrize("name", TINY)
def test_onnx_matches_pytorch_at_new_shapes(tiny_model: Callable[[str], Path], name: str) -> None:
    """Independently of the exporter's own check: batch 3, another non-square size, another seed."""
    folder = tiny_model(name)
    pipe = tiny.build(presets.get(name))
    for graph in component_graphs(pipe):
        inputs = graph.inputs(Shape(batch=3, latent_height=12, latent_width=20), seed=7)
        expected = graph.run(inputs)
        session = ort.InferenceSession(str(folder / graph.name / "model.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(list(expected), {k: v.numpy() for k, v in inputs.items()})
        for (out_name, want), have in zip(expected.items(), got, strict=True):
            np.testing.assert_allclose(have, want.numpy(), atol=1e-4, rtol=1e-4, err_msg=f"{graph.name}.{out_name}")


def test_two_builds_are_byte_identical(tmp_path: Path) -> None:
    for out in ("a", "b"):
        export_model(ExportSettings(preset="tiny-sd15", output=str(tmp_path / out)))
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    assert len(files_a) >= 10
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_local_diffusers_folder_as_model(tmp_path: Path, tiny_model: Callable[[str], Path]) -> None:
    pipe = tiny.build(presets.get("tiny-sd21"))
    pipe.save_pretrained(tmp_path / "checkpoint")
    report = export_model(ExportSettings(preset="sd21", model=str(tmp_path / "checkpoint"),
                                         output=str(tmp_path / "out")))
    manifest = mf.read(tmp_path / "out")
    assert manifest.source.kind == "folder"
    assert manifest.source.id == str((tmp_path / "checkpoint").resolve())
    assert manifest.family == "sd2" and manifest.prediction_type == "v_prediction"
    assert manifest.sizes.step == 64  # the preset's 64 (the tiny UNet alone would allow 16)
    assert all(c.max_diff < 1e-4 for c in report.components)
    # Same weights as the random preset: the UNet computes the same function.
    ours = ort.InferenceSession(str(tmp_path / "out/unet/model.onnx"))
    theirs = ort.InferenceSession(str(tiny_model("tiny-sd21") / "unet/model.onnx"))
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32),
             "timestep": np.array([500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 77, 32), dtype=np.float32)}
    np.testing.assert_allclose(ours.run(None, feeds)[0], theirs.run(None, feeds)[0], atol=1e-6)


def test_fp16_export_keeps_the_vae_in_fp32(tmp_path: Path) -> None:
    report = export_model(ExportSettings(preset="tiny-sdxl", precision="fp16", output=str(tmp_path / "m")))
    manifest = mf.read(tmp_path / "m")
    assert manifest.components["unet"].precision == "fp16"
    assert manifest.components["text_encoder_2"].precision == "fp16"
    assert manifest.components["vae_decoder"].precision == "fp32"
    sample = next(t for t in manifest.components["unet"].inputs if t.name == "sample")
    assert sample.dtype == "float16"
    decoder_in = manifest.components["vae_decoder"].inputs[0]
    assert decoder_in.dtype == "float32"
    for component in report.components:
        assert component.max_diff <= component.tolerance


def test_existing_output_needs_force(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--force"):
        export_model(ExportSettings(preset="tiny-sd15", output=str(target)))
    assert (target / "keep.txt").read_text() == "mine"
    export_model(ExportSettings(preset="tiny-sd15", output=str(target), force=True))
    assert not (target / "keep.txt").exists()
    assert (target / "model.json").is_file()
    assert _leftovers(tmp_path, ".partial-") == [] and _leftovers(tmp_path, ".old-") == []


def test_failed_export_leaves_nothing_behind(tmp_path: Path) -> None:
    # A zero tolerance fails the check of the first graph, after files were written to the staging folder.
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_model(ExportSettings(preset="tiny-sd15", output=str(tmp_path / "m"), tolerance=0.0))
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_a_model_and_prints_a_summary(tmp_path: Path) -> None:
    result = _run_cli("tiny-sd15", "--output", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert "exported tiny-sd15" in result.stdout
    assert "unet" in result.stdout and "max |onnx - torch|" in result.stdout
    assert "[2/4] unet" in result.stderr  # progress
    assert mf.read(tmp_path / "m").name == "tiny-sd15"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no-such-preset"], "unknown preset 'no-such-preset'"),
        (["sd15", "--model", "/no/such/folder"], "no such checkpoint file or folder"),
        (["sd15", "--model", "{tmp}/notapipeline"], "not a diffusers pipeline folder"),
        (["sd15", "--model", "{tmp}/truncated.safetensors", "--config", "{tmp}/notapipeline"], "cannot load"),
        (["sdxl", "--model", "{tmp}/sd15"], "is an SD 1.x/2.x checkpoint, but preset 'sdxl' is sdxl"),
        (["tiny-sd15", "--tensorrt"], "TensorRT"),
        (["tiny-sd15", "--opset", "11"], "opset"),
        (["tiny-sd15", "--fp16-vae"], "--fp16-vae needs --precision fp16"),
        (["sd15"], "cannot reach the Hugging Face hub"),  # no network here and in CI
    ],
)
def test_cli_failures_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "notapipeline").mkdir()
    (tmp_path / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": trunc")
    if "{tmp}/sd15" in args:
        tiny.build(presets.get("tiny-sd15")).save_pretrained(tmp_path / "sd15")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = _run_cli(*args, "--output", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("export: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "torchvision" not in result.stderr  # no library import noise around the one line
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path, ".partial-") == []


def test_file_size_limit_mid_export_is_a_clean_failure(tmp_path: Path) -> None:
    """A write that fails part-way (here RLIMIT_FSIZE, as a full disk would) exits 2 and leaves nothing."""
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))\n"
        "from export.__main__ import main\n"
        f"sys.exit(main(['tiny-sd15', '--output', {str(tmp_path / 'm')!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("export: error:")]
    assert len(errors) == 1 and "too large" in errors[0].lower(), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_graphs_follow_the_common_layout(tiny_model: Callable[[str], Path]) -> None:
    manifest = mf.read(tiny_model("tiny-sdxl"))
    unet_inputs = [t.name for t in manifest.components["unet"].inputs]
    assert unet_inputs == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert [t.name for t in manifest.components["unet"].outputs] == ["out_sample"]
    assert [t.name for t in manifest.components["vae_decoder"].inputs] == ["latent_sample"]
    assert [t.name for t in manifest.components["vae_encoder"].outputs] == ["latent_parameters"]
    te2 = [t.name for t in manifest.components["text_encoder_2"].outputs]
    assert te2[:2] == ["text_embeds", "last_hidden_state"] and "hidden_states.1" in te2
    assert manifest.text_encoders[1].hidden_output == "hidden_states.1"  # penultimate of 2 layers
    assert manifest.force_zeros_for_empty_prompt is True
    unet_sample = manifest.components["unet"].inputs[0]
    assert unet_sample.shape == ["batch", 4, "height", "width"]
