"""ONNX folders written by `optimum-cli export onnx --task text-to-image`, served as they are.

The folders under tests/fixtures/optimum/ and the reference pixels beside them (`<name>.npz`, rendered
by diffusers from the PyTorch pipeline optimum exported, for the stored starting latents) come from
tests/fixtures/make_optimum_fixtures.sh, which runs optimum in its own environment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import engines
from engines import manifest as mf
from engines import optimum_folder
from tests.processes import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "optimum"
FOLDERS = ("sd15", "sd21", "sdxl")
TOLERANCE = 1e-4  # max pixel difference on a 0-1 scale


@pytest.fixture(scope="module")
def pipelines() -> dict[str, engines.Pipeline]:
    return {name: engines.load(FIXTURES / name, backend="cpu") for name in FOLDERS}


@pytest.mark.parametrize("name", FOLDERS)
def test_renders_equal_diffusers(pipelines: dict[str, engines.Pipeline], name: str) -> None:
    reference = np.load(FIXTURES / f"{name}.npz")
    assert len(reference["samplers"]) == 2
    for sampler, expected in zip(reference["samplers"], reference["pixels"], strict=True):
        request = engines.RenderRequest(
            prompt=str(reference["prompt"]), negative_prompt=str(reference["negative"]),
            width=int(reference["width"]), height=int(reference["height"]), steps=int(reference["steps"]),
            guidance_scale=float(reference["guidance"]), sampler=str(sampler), seed=0)
        result = pipelines[name].render(request, latents=reference["latents"])
        assert result.pixels.shape == expected.shape
        difference = float(np.abs(result.pixels - expected).max())
        assert difference <= TOLERANCE, f"{name} {sampler}: max pixel difference {difference:.2e}"


def test_inferred_manifests(pipelines: dict[str, engines.Pipeline]) -> None:
    sd15, sd21, sdxl = (pipelines[name].manifest for name in FOLDERS)
    assert (sd15.family, sd21.family, sdxl.family) == ("sd1", "sd2", "sdxl")
    assert (sd15.prediction_type, sd21.prediction_type, sdxl.prediction_type) == ("epsilon", "v_prediction", "epsilon")
    assert sdxl.force_zeros_for_empty_prompt and not sd15.force_zeros_for_empty_prompt
    # optimum keeps transformers' slow layout: vocab.json + merges.txt, not tokenizer.json
    assert all(t.merges is not None and t.file.path.endswith("vocab.json") for t in sdxl.tokenizers.values())
    assert sdxl.tokenizers["tokenizer_2"].pad_id != sdxl.tokenizers["tokenizer"].pad_id  # "!" vs <|endoftext|>
    # the tiny encoders have 2 layers: hidden_states.0..2, the penultimate is 1
    assert [e.hidden_output for e in sdxl.text_encoders] == ["hidden_states.1", "hidden_states.1"]
    assert sdxl.text_encoders[1].pooled_output == "text_embeds"
    unet_inputs = {t.name: t for t in sdxl.components["unet"].inputs}
    assert unet_inputs["timestep"].shape == [] and unet_inputs["text_embeds"].dtype == "float32"
    assert sdxl.components["text_encoder"].inputs[0].dtype == "int64"
    # tiny UNet: sample_size 16 at the ×8 VAE, one down-sampling → 128 native, steps of 16
    assert (sd15.defaults.width, sd15.sizes.step, sd15.sizes.min, sd15.sizes.max) == (128, 16, 64, 256)
    assert sd21.defaults.sampler == "ddim" and sdxl.defaults.sampler == "euler"


def test_missing_files_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(FIXTURES / "sdxl", folder)
    (folder / "tokenizer_2" / "merges.txt").unlink()
    (folder / "vae_encoder" / "model.onnx").unlink()
    with pytest.raises(engines.ModelInvalid) as caught:
        engines.load(folder, backend="cpu")
    message = str(caught.value)
    assert "vae_encoder/model.onnx" in message and "tokenizer_2/" in message and "tokenizer/ " not in message


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(engines.ModelNotFound, match=r"model_index\.json"):
        engines.load(tmp_path, backend="cpu")


def test_adopt_writes_a_checked_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "adopted"
    shutil.copytree(FIXTURES / "sd21", folder)
    done = subprocess.run([sys.executable, "-m", "export", "adopt", str(folder)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "sd2/base, v_prediction" in done.stdout
    manifest = mf.read(folder)  # hashes checked
    assert all(len(ref.sha256) == 64 for ref in manifest.files())
    assert {ref.path for ref in manifest.files()} >= {"unet/model.onnx", "tokenizer/vocab.json", "tokenizer/merges.txt"}
    in_place = optimum_folder.infer(FIXTURES / "sd21")
    assert manifest.family == in_place.family and manifest.text_encoders == in_place.text_encoders
    again = subprocess.run([sys.executable, "-m", "export", "adopt", str(folder)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2 and "--force" in again.stderr
    # the adopted folder now loads like our exports: a changed file is caught
    merges = folder / "tokenizer" / "merges.txt"
    text = merges.read_text()
    merges.write_text(text.replace("i n", "n i", 1))
    with pytest.raises(engines.ModelInvalid, match="sha256"):
        engines.load(folder, backend="cpu")


def test_render_cli_takes_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "cat.png"
    done = subprocess.run([sys.executable, "-m", "engines", "render", str(FIXTURES / "sd15"), "--prompt", "a cat",
                           "--size", "64x64", "--steps", "2", "--backend", "cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "inferred from its optimum layout" in done.stderr and out.is_file()
    assert json.loads((FIXTURES / "sd15" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_batched_renders_on_a_one_timestep_unet(pipelines: dict[str, engines.Pipeline]) -> None:
    """optimum's UNet takes one timestep for the whole batch: renders share a call only at the same timestep
    (same schedule, same step), and still give the images they give alone."""
    from tests.engines import batches

    pipeline = pipelines["sd15"]
    assert pipeline.manifest.components["unet"].inputs[1].shape == []  # a scalar timestep
    mix = [engines.RenderRequest(prompt="a red cube", width=128, height=128, steps=steps, guidance_scale=5.0,
                                 sampler="euler", seed=seed) for steps, seed in ((4, 1), (4, 2), (6, 3))]
    renderings, calls = batches.run(pipeline, [(0, lambda r=r: pipeline.begin(r)) for r in mix])
    assert [0, 1] in calls and not any(2 in call and len(call) > 1 for call in calls)
    for rendering, alone in zip(renderings, mix, strict=True):
        np.testing.assert_allclose(rendering.result().pixels, pipeline.render(alone).pixels, atol=1e-5)
