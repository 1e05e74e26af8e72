"""ControlNet export: UNets that take ControlNet residuals, and ControlNets as ONNX graphs beside the model they
serve, checked here against diffusers' own modules (not our wrappers) at shapes the exporter never saw."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers import ControlNetModel

from engines import manifest as mf
from export import controlnet as cn
from export import presets, tiny
from export.controlnet import ControlNetSettings, export_controlnet

ROOT = Path(__file__).resolve().parents[2]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _conditioning(family: str, batch: int, h: int, w: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    inputs = {"encoder_hidden_states": torch.randn(batch, 77, 64 if family == "sdxl" else 32, generator=gen)}
    if family == "sdxl":
        inputs["text_embeds"] = torch.randn(batch, 32, generator=gen)
        inputs["time_ids"] = torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]] * batch, dtype=torch.float32)
    return inputs


def _added(inputs: dict[str, torch.Tensor]) -> dict[str, object]:
    if "text_embeds" not in inputs:
        return {}
    return {"added_cond_kwargs": {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}}


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_controlnet_matches_diffusers_and_its_residuals_steer_the_unet(
        controlnet_model: Callable[[str], Path], name: str) -> None:
    """ONNX ControlNet == diffusers' ControlNetModel; the residual-taking ONNX UNet fed them == diffusers' UNet
    given `down_block_additional_residuals`; the residuals are not zero (the preset's zero convolutions are
    drawn) and they change the UNet's output."""
    folder = controlnet_model(name)
    manifest = mf.read(folder)
    family = manifest.family
    preset = f"tiny-controlnet-{'sdxl' if family == 'sdxl' else 'sd15'}"
    entry = manifest.controlnets[preset]
    mf.check_refs(folder, entry.files())  # its files are there, with the sizes and hashes recorded
    assert entry.family == family and entry.source == mf.Source(kind="random", id=preset, seed=cn.PRESETS[preset].seed)
    assert (folder / "controlnets" / preset / "config.json").is_file()

    model = cn.random_controlnet(cn.PRESETS[preset])
    unet = tiny.build(presets.get(name)).unet
    gen = torch.Generator().manual_seed(5)
    b, h, w = 3, 12, 20
    inputs = {"sample": torch.randn(b, 4, h, w, generator=gen), "timestep": torch.tensor([10.0, 500.0, 990.0]),
              **_conditioning(family, b, h, w, gen)}
    image = torch.rand(b, 3, h * 8, w * 8, generator=gen)
    with torch.no_grad():
        down, mid = model(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], image,
                          return_dict=False, **_added(inputs))
    feeds = {k: v.numpy() for k, v in inputs.items()}
    names = [*manifest.residuals.down, manifest.residuals.mid]
    got = _session(folder / entry.component.graph.path).run(names, feeds | {"controlnet_cond": image.numpy()})
    for have, want, residual in zip(got, [*down, mid], names, strict=True):
        np.testing.assert_allclose(have, want.numpy(), atol=1e-4, rtol=1e-4, err_msg=residual)
        assert np.abs(have).max() > 0.05, residual

    with torch.no_grad():
        expected = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                        down_block_additional_residuals=down, mid_block_additional_residual=mid,
                        return_dict=False, **_added(inputs))[0]
        plain = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], return_dict=False,
                     **_added(inputs))[0]
    unet_onnx = _session(folder / "unet" / "model.onnx")
    steered = unet_onnx.run(["out_sample"], feeds | dict(zip(names, got, strict=True)))[0]
    np.testing.assert_allclose(steered, expected.numpy(), atol=1e-4, rtol=1e-4)
    assert np.abs(steered - plain.numpy()).max() > 1e-2  # the ControlNet changes the prediction


def test_zero_residuals_are_the_plain_unet(controlnet_model: Callable[[str], Path],
                                           tiny_model: Callable[[str], Path]) -> None:
    """A render without ControlNet feeds zeros: the UNet then computes what the plain export does."""
    folder = controlnet_model("tiny-sd15")
    manifest = mf.read(folder)
    specs = {t.name: t for t in manifest.components["unet"].inputs}
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 16, 12), dtype=np.float32),
             "timestep": np.array([500.0, 20.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    zeros = {}
    for name in (*manifest.residuals.down, manifest.residuals.mid):
        scale = 2 if specs[name].shape[2] == "height/2" else 1
        zeros[name] = np.zeros((2, specs[name].shape[1], 16 // scale, 12 // scale), np.float32)
    with_inputs = _session(folder / "unet" / "model.onnx").run(["out_sample"], feeds | zeros)[0]
    plain = _session(tiny_model("tiny-sd15") / "unet" / "model.onnx").run(["out_sample"], feeds)[0]
    np.testing.assert_allclose(with_inputs, plain, atol=1e-5)
    assert mf.read(tiny_model("tiny-sd15")).residuals is None  # a plain export takes none


def _copy(model: Path, target: Path) -> Path:
    shutil.copytree(model, target, ignore=shutil.ignore_patterns("controlnets"))
    manifest = msgspec.structs.replace(mf.read(target), controlnets={})
    (target / mf.MANIFEST_FILE).write_bytes(mf.encode(manifest))
    return target


def test_local_folder_and_single_file_sources(controlnet_model: Callable[[str], Path], tmp_path: Path) -> None:
    """A diffusers ControlNetModel folder, and its .safetensors alone with --config, export the same graph as
    the preset they were saved from, under the names given; both are recorded beside each other."""
    model = _copy(controlnet_model("tiny-sd15"), tmp_path / "model")
    cn.random_controlnet(cn.PRESETS["tiny-controlnet-sd15"]).save_pretrained(tmp_path / "saved")
    weights = tmp_path / "canny-tiny.safetensors"
    shutil.copy(tmp_path / "saved" / "diffusion_pytorch_model.safetensors", weights)
    folder = export_controlnet(ControlNetSettings(source=str(tmp_path / "saved"), model_dir=str(model), name="mine"))
    single = export_controlnet(ControlNetSettings(source=str(weights), model_dir=str(model),
                                                  config=str(tmp_path / "saved")))
    assert (folder.name, single.name) == ("mine", "canny-tiny")
    manifest = mf.read(model)
    assert set(manifest.controlnets) == {"mine", "canny-tiny"}
    assert manifest.controlnets["mine"].source.kind == "folder"
    assert manifest.controlnets["canny-tiny"].source.sha256 == mf.sha256_file(weights)
    rng = np.random.default_rng(1)
    feeds = {"sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32), "timestep": np.array([300.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 77, 32), dtype=np.float32),
             "controlnet_cond": rng.random((1, 3, 64, 64), dtype=np.float32)}
    outputs = [_session(model / entry.component.graph.path).run(None, feeds)
               for entry in (manifest.controlnets["mine"], manifest.controlnets["canny-tiny"])]
    preset = _session(controlnet_model("tiny-sd15") / "controlnets/tiny-controlnet-sd15/model.onnx").run(None, feeds)
    for a, b, c in zip(*outputs, preset, strict=True):
        np.testing.assert_allclose(a, c, atol=1e-6)
        np.testing.assert_allclose(b, c, atol=1e-6)


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "export", "controlnet", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize(
    ("source", "model", "extra", "message"),
    [
        ("tiny-controlnet-sdxl", "cn-sd15", [], "is an SDXL ControlNet, but {model} is an SD 1.x model"),
        ("tiny-controlnet-sd15", "cn-sdxl", [], "is an SD 1.x ControlNet, but {model} is an SDXL model"),
        ("tiny-controlnet-sd15", "cn-sd21", [], "is an SD 1.x ControlNet, but {model} is an SD 2.x model"),
        ("{tmp}/wide", "cn-sd15", [], "has cross-attention size 48, but the UNet of {model} (sd1) has 32"),
        ("tiny-controlnet-sd15", "plain-sd15", [], "takes no ControlNet residuals; export the model again with "
                                                   "--controlnet"),
        ("tiny-controlnet-sd15", "cn-sd15", [], "already has a ControlNet named 'tiny-controlnet-sd15'; pass --force"),
        ("tiny-controlnet-sd15", "cn-sd15", ["--name", "../x"], "--name '../x'"),
        ("/no/such/controlnet", "cn-sd15", [], "no such ControlNet preset, file or folder"),
        ("{tmp}/empty", "cn-sd15", [], "is not a diffusers ControlNetModel folder"),
        ("lllyasviel/control_v11p_sd15_canny", "cn-sd15", [], "cannot reach the Hugging Face hub"),
        ("tiny-controlnet-sd15", "{tmp}/empty", [], "is not a model directory"),
    ],
)
def test_cli_refusals_are_one_line_and_write_nothing(
        controlnet_model: Callable[[str], Path], tiny_model: Callable[[str], Path], tmp_path: Path,
        source: str, model: str, extra: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    models = {"cn-sd15": lambda: controlnet_model("tiny-sd15"), "cn-sdxl": lambda: controlnet_model("tiny-sdxl"),
              "cn-sd21": lambda: controlnet_model("tiny-sd21"), "plain-sd15": lambda: tiny_model("tiny-sd15")}
    folder = models[model]() if model in models else Path(model.replace("{tmp}", str(tmp_path)))
    if source == "{tmp}/wide":
        config = dict(cn.random_controlnet(cn.PRESETS["tiny-controlnet-sd15"]).config)
        (tmp_path / "wide").mkdir()
        wide = ControlNetModel.from_config({**config, "cross_attention_dim": 48})
        wide.save_pretrained(tmp_path / "wide")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    result = _run_cli(source.replace("{tmp}", str(tmp_path)), "--for", str(folder), *extra)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("export: error:")]
    assert len(errors) == 1 and message.replace("{model}", str(folder)) in errors[0], result.stderr
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # nothing written or left


def test_cli_exports_prints_a_summary_and_force_replaces(controlnet_model: Callable[[str], Path],
                                                         tmp_path: Path) -> None:
    model = _copy(controlnet_model("tiny-sd15"), tmp_path / "model")
    for attempt in range(2):
        result = _run_cli("tiny-controlnet-sd15", "--for", str(model), "--name", "edges",
                          *(["--force"] if attempt else []))
        assert result.returncode == 0, result.stderr
        assert f"exported ControlNet edges (sd1) for {model}" in result.stdout
        assert "[1/1] controlnet edges" in result.stderr  # progress
    manifest = json.loads((model / mf.MANIFEST_FILE).read_text())
    assert list(manifest["controlnets"]) == ["edges"]
    assert sorted(p.name for p in (model / "controlnets").iterdir()) == ["edges"]  # no staging leftovers
