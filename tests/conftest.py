"""Session fixtures: the tiny model directories, exported once per test session (never committed)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY = ("tiny-sd15", "tiny-sd15-inpaint", "tiny-sd21", "tiny-sdxl")


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_root: Path) -> Callable[[str], Path]:
    """`tiny_model("tiny-sdxl")` → the exported model directory, built on first use."""
    from export import ExportSettings, export_model

    def get(name: str) -> Path:
        target = models_root / name
        if not (target / "model.json").is_file():
            export_model(ExportSettings(preset=name, output=str(target)))
        return target

    return get


@pytest.fixture(scope="session")
def models_dir(tiny_model: Callable[[str], Path], models_root: Path) -> Path:
    """A models directory holding every tiny model, as a server's --models-dir."""
    for name in TINY:
        tiny_model(name)
    return models_root


LORA_RANK = 8  # tests' LoRA-capable exports take up to this total adapter rank


@pytest.fixture(scope="session")
def lora_model(models_root: Path) -> Callable[[str], Path]:
    """`lora_model("tiny-sdxl")` → the model exported with `--lora-rank 8`, built on first use (kept out of
    `models_dir`, so that servers started on it see only the plain exports)."""
    from export import ExportSettings, export_model

    def get(name: str) -> Path:
        target = models_root.parent / "lora-models" / name
        if not (target / "model.json").is_file():
            export_model(ExportSettings(preset=name, output=str(target), lora_rank=LORA_RANK))
        return target

    return get


TAESD_SEED = 5


@pytest.fixture(scope="session")
def taesd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny autoencoder (diffusers' AutoencoderTiny, narrow), saved as a local folder."""
    import torch
    from diffusers import AutoencoderTiny

    from export import tiny_decoder

    folder = tmp_path_factory.mktemp("taesd")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TAESD_SEED)
        AutoencoderTiny(**tiny_decoder.TINY_CONFIG).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def taesd_model(models_root: Path, taesd_folder: Path) -> Path:
    """tiny-sd15 exported with `--tiny-decoder FOLDER` (kept out of `models_dir`, like the LoRA exports)."""
    from export import ExportSettings, export_model

    target = models_root.parent / "taesd-models" / "tiny-sd15-taesd"
    if not (target / "model.json").is_file():
        export_model(ExportSettings(preset="tiny-sd15", output=str(target), tiny_decoder=str(taesd_folder)))
    return target


@pytest.fixture(scope="session")
def controlnet_model(models_root: Path) -> Callable[[str], Path]:
    """`controlnet_model("tiny-sdxl")` → the model exported with `--controlnet` (its UNet takes ControlNet
    residuals) plus the tiny ControlNet preset made from its UNet, if there is one, named as the preset;
    built on first use, kept out of `models_dir`."""
    from export import ExportSettings, export_model
    from export.controlnet import PRESETS, ControlNetSettings, export_controlnet

    def get(name: str) -> Path:
        target = models_root.parent / "controlnet-models" / name
        if not (target / "model.json").is_file():
            export_model(ExportSettings(preset=name, output=str(target), controlnet=True))
            for preset in (p for p in PRESETS.values() if p.base == name):
                export_controlnet(ControlNetSettings(source=preset.name, model_dir=str(target)))
        return target

    return get


@pytest.fixture
def tiny_sd15(tiny_model: Callable[[str], Path]) -> Path:
    """A models folder holding tiny-sd15 (and whatever else the session exported: give servers --model)."""
    return tiny_model("tiny-sd15").parent


@pytest.fixture
def faults(tmp_path: Path) -> Iterator[Path]:
    """A folder of fault files for a server started with `tests.faults.environment` (removing `pause` at the
    end, so that no render stays held)."""
    folder = tmp_path / "faults"
    folder.mkdir()
    yield folder
    (folder / "pause").unlink(missing_ok=True)
