"""Writing a model directory: staged beside the target and renamed into place only when complete, so a
failed or interrupted export never leaves a half-written model behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines import manifest as mf
from export.errors import ExportError

if TYPE_CHECKING:  # diffusers only for the type: `export adopt` writes manifests without importing it
    from diffusers import DiffusionPipeline

STAGING_MARK = ".partial-"


@contextmanager
def staging(target: Path, force: bool) -> Iterator[Path]:
    """A fresh folder beside `target`; renamed to `target` when the block succeeds, removed otherwise."""
    target = target.resolve()
    if target.exists() and not force:
        raise ExportError(f"{target} already exists; pass --force to replace it")
    stage = target.parent / f".{target.name}{STAGING_MARK}{uuid.uuid4().hex[:8]}"
    try:
        stage.mkdir(parents=True)
        yield stage
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            stage.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(target)
    except OSError as exc:
        raise ExportError(_describe_os_error(exc, target)) from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _describe_os_error(exc: OSError, target: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return f"disk full while writing {target} ({exc.filename or 'model files'})"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {exc.filename or target}: {exc.strerror}"
    return f"writing {target} failed: {exc}"


def write_tokenizer(tokenizer: object, folder: Path) -> str:
    """Save in the transformers layout and make sure `tokenizer.json` exists: serving reads only that,
    with the `tokenizers` package."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():  # a slow (pure-python) tokenizer: save its fast twin's state
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(folder, use_fast=True).backend_tokenizer.save(str(path))
    return path.name


def write_configs(pipe: DiffusionPipeline, stage: Path, components: list[str]) -> None:
    """The pipeline's `model_index.json`, the scheduler config and each component's `config.json`, as
    `optimum-cli export onnx` lays them out."""
    pipe.save_config(stage)
    _strip_local_paths(stage / "model_index.json")
    pipe.scheduler.save_pretrained(stage / "scheduler")
    _keep_default_markers(pipe.scheduler.config, stage / "scheduler" / "scheduler_config.json")
    for name in components:
        module = pipe.vae if name.startswith("vae_") else getattr(pipe, name)
        config = module.config
        target = stage / name / "config.json"
        if hasattr(config, "to_json_file"):  # transformers
            config.to_json_file(target)
        else:  # diffusers FrozenDict config
            module.save_config(stage / name)
        _strip_local_paths(target)


def _keep_default_markers(config: Mapping[str, Any], path: Path) -> None:
    """`save_pretrained` drops `_use_default_values`, the keys the source config left unset. Without it
    a sampler swapped in at serve time would inherit the source class's defaults (SD 1.5's PNDM pins
    "leading" spacing) where diffusers' `from_config` gives the target class's own ("linspace" for Euler)."""
    markers = config.get("_use_default_values")
    if markers:
        saved = json.loads(path.read_text())
        saved["_use_default_values"] = sorted(markers)
        path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _strip_local_paths(path: Path) -> None:
    """Configs remember where they were loaded from; drop that, so builds from different places agree."""
    config = json.loads(path.read_text())
    if "_name_or_path" in config:
        del config["_name_or_path"]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_manifest(stage: Path, manifest: mf.Manifest) -> None:
    (stage / mf.MANIFEST_FILE).write_bytes(mf.encode(manifest))


def replace_manifest(root: Path, manifest: mf.Manifest) -> None:
    """Rewrite the manifest of a finished model directory (TensorRT plans added): atomically, so that a
    server loading the model meanwhile reads the old manifest or the new one, never half of one."""
    write_atomically(root / mf.MANIFEST_FILE, mf.encode(manifest))


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    temporary = path.with_name(f".{path.name}{STAGING_MARK}{uuid.uuid4().hex[:8]}")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError as exc:
        raise ExportError(_describe_os_error(exc, path)) from exc
    finally:
        temporary.unlink(missing_ok=True)
