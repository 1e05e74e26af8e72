"""fp16 exports keep what fp16 cannot hold in fp32: checked on the exported graph's own types."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from export import ExportSettings, export_model


@pytest.fixture(scope="module", params=["none", "cpu"])
def sd21_fp16(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The raw graph, and the one fused by `--optimize cpu` before its fp16 conversion."""
    target = tmp_path_factory.mktemp("fp16") / "tiny-sd21"
    export_model(ExportSettings(preset="tiny-sd21", precision="fp16", output=str(target), optimize=request.param))
    return target


def _output_types(path: Path) -> tuple[onnx.GraphProto, dict[str, int]]:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output)}
    return model.graph, types


def test_sd2_attention_scores_and_softmax_stay_fp32(sd21_fp16: Path) -> None:
    graph, types = _output_types(sd21_fp16 / "unet" / "model.onnx")
    producer = {o: n for n in graph.node for o in n.output}
    softmaxes = [n for n in graph.node if n.op_type == "Softmax" and "/attn" in n.name]
    assert softmaxes, "the tiny SD 2.x UNet has attention layers"
    for softmax in softmaxes:
        assert types[softmax.output[0]] == onnx.TensorProto.FLOAT, softmax.name
        scores = producer[softmax.input[0]]
        assert scores.op_type == "MatMul" and types[scores.output[0]] == onnx.TensorProto.FLOAT, scores.name
    # the rest of the attention (the weights' projections) is fp16
    projections = [n for n in graph.node if n.name.endswith("/to_q/MatMul")]
    assert projections and all(types[n.output[0]] == onnx.TensorProto.FLOAT16 for n in projections)


def test_the_timestep_sinusoid_stays_fp32(sd21_fp16: Path) -> None:
    graph, types = _output_types(sd21_fp16 / "unet" / "model.onnx")
    trig = [n for n in graph.node if n.op_type in ("Sin", "Cos")]
    assert trig and all("/time_proj/" in n.name for n in trig)
    assert all(types[n.output[0]] == onnx.TensorProto.FLOAT for n in trig)
    # the timestep arrives fp32 and its product with the frequencies is computed in fp32
    argument = [n for n in graph.node if n.name.endswith("/time_proj/Mul")]
    assert argument and types[argument[0].output[0]] == onnx.TensorProto.FLOAT

