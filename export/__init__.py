"""Checkpoints (hub id, diffusers folder, single file) → ONNX model directories with a `model.json`.

`python -m export PRESET` is the command; `export_model(ExportSettings(...))` the library call.
"""

from export.errors import ExportError
from export.exporter import ExportReport, ExportSettings, export_model

__all__ = ["ExportError", "ExportReport", "ExportSettings", "export_model"]
