"""The models folder (`--models-dir`): which model directories it offers, and, when it offers none, why.

`--models-dir` is a folder of model directories, or one model directory itself (what `python -m export NAME
--output DIR` writes): a folder that holds `model.json` (our export) or `model_index.json` (an ONNX folder in
optimum's layout) is a model, served under its folder's name.
"""

from __future__ import annotations

from pathlib import Path

import engines

WHAT_IS_A_MODEL = "a model directory holds model.json (python -m export) or model_index.json (optimum's layout)"


def discover(models_dir: str | Path, only: list[str]) -> list[Path]:
    """The model directories to serve, by name: the folder itself when it is one, else its subfolders that
    are (restricted to the `only` ids when given)."""
    root = Path(models_dir)
    if engines.is_model_dir(root):
        found = [root]
    elif root.is_dir():
        found = sorted(p for p in root.iterdir() if engines.is_model_dir(p))
    else:
        found = []
    return [p for p in found if not only or p.name in only]


def nothing_servable(models_dir: str | Path, only: list[str]) -> str | None:
    """Why `discover` finds no model here, in one line (None when it finds some)."""
    root = Path(models_dir)
    if discover(root, only):
        return None
    where = f"no models found in {root}"
    if not root.exists():
        return f"{where}: it does not exist"
    if not root.is_dir():
        return f"{where}: it is a file, not a folder"
    models = discover(root, [])
    if models:
        asked = ", ".join(only)
        return f"{where} named {asked} (--model): it has {', '.join(p.name for p in models)}"
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        return f"{where}: it holds no folders ({WHAT_IS_A_MODEL})"
    return f"{where} ({WHAT_IS_A_MODEL}): " + "; ".join(f"{p.name}/ {_why_not(p)}" for p in folders)


def _why_not(folder: Path) -> str:
    inner = [p.name for p in sorted(folder.iterdir()) if p.is_dir() and engines.is_model_dir(p)]
    if inner:
        return f"holds model directories itself ({', '.join(inner)}): point --models-dir at {folder}"
    if not any(folder.iterdir()):
        return "is empty"
    return "has neither model.json nor model_index.json"
