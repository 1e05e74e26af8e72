"""`python -m export adopt DIR`: write the manifest of an ONNX pipeline folder in optimum's layout (as
`optimum-cli export onnx` or a hub repository's `onnx` branch has it) into the folder, with every file's
sha256, so that later loads check its files like those of our own exports. Nothing is converted: the
folder's graphs and tokenizers are served as they are."""

from __future__ import annotations

from pathlib import Path

from engines import manifest as mf
from engines import optimum_folder
from engines.errors import EngineError
from export import model_dir
from export.errors import ExportError


def adopt(folder: str | Path, force: bool = False) -> mf.Manifest:
    root = Path(folder)
    if (root / mf.MANIFEST_FILE).is_file() and not force:
        raise ExportError(f"{root} already has a {mf.MANIFEST_FILE}; pass --force to infer and write it again")
    if not (root / optimum_folder.INDEX_FILE).is_file():
        raise ExportError(f"{root}: no {optimum_folder.INDEX_FILE}; not an ONNX pipeline folder in the optimum layout")
    try:
        # Inferred from the files alone: an old manifest (with --force) must not stand in for them.
        manifest = optimum_folder.infer(root, hashes=True)
    except EngineError as exc:
        raise ExportError(str(exc)) from exc
    model_dir.write_atomically(root / mf.MANIFEST_FILE, mf.encode(manifest))
    return manifest
