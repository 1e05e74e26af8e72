"""Checking an exported graph: ONNX Runtime against the PyTorch module on the same random inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.errors import ExportError

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
              "tensor(int64)": np.int64}


def max_difference(graph_file: Path, inputs: dict[str, torch.Tensor],
                   reference: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Run the graph in ONNX Runtime (CPU) and return (max |ort - torch|, max |torch|) over all outputs."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(graph_file), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind error types
        raise ExportError(f"ONNX Runtime cannot load {graph_file}: {exc}") from exc
    feeds = {i.name: inputs[i.name].numpy().astype(_ORT_TYPES[i.type]) for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, feeds), strict=True))
    worst, scale = 0.0, 0.0
    for name, expected in reference.items():
        want = expected.float().numpy()
        got = outputs[name].astype(np.float32)
        if got.shape != want.shape:
            raise ExportError(f"{graph_file}: output {name} has shape {got.shape}, PyTorch gives {want.shape}")
        worst = max(worst, float(np.abs(got - want).max()))
        scale = max(scale, float(np.abs(want).max()))
    return worst, scale
