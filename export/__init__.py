"""Checkpoints (hub id, diffusers folder, single file) → ONNX model directories with a `model.json`.

`python -m export PRESET` is the command; `export_model(ExportSettings(...))` the library call.
"""

from typing import TYPE_CHECKING

from export.errors import ExportError

__all__ = ["ExportError", "ExportReport", "ExportSettings", "export_model"]

if TYPE_CHECKING:
    from export.exporter import ExportReport, ExportSettings, export_model


def __getattr__(name: str) -> object:
    # Imported on first use: torch and diffusers take seconds, and `python -m export adopt` needs neither.
    if name in ("ExportReport", "ExportSettings", "export_model"):
        from export import exporter

        return getattr(exporter, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
