"""Which nodes of an fp16 graph must stay fp32.

ONNX Runtime's float16 converter turns every float tensor (and every Cast to float) into fp16. Two parts
of a UNet do not survive that on a GPU:

* the timestep sinusoid (`time_proj`, SDXL's `add_time_proj`): `timestep × frequency` reaches ~1000
  radians, where fp16's step is 0.5, so sin/cos come out as noise;
* SD 2.x attention scores: diffusers upcasts `Q·Kᵀ` and the softmax to fp32 (`upcast_attention`), as
  their logits overflow fp16's 65504 and the softmax turns into NaN (black images).

The export's check against PyTorch runs on ONNX Runtime's CPU provider, which has no fp16 kernels for
most operators and computes them in fp32: it cannot see either problem. The graph inspection in the
tests and the GPU test of a 768² UNet can.
"""

from __future__ import annotations

import onnx

TIME_PROJECTIONS = ("/time_proj/", "/add_time_proj/")


def fp32_nodes(graph: onnx.GraphProto, attention: bool) -> list[str]:
    """Names of the nodes to keep in fp32: the time projections and, with `attention`, each attention's
    scores (the Q·Kᵀ MatMul, the Muls that scale its inputs) and softmax."""
    keep = [n.name for n in graph.node if any(scope in n.name for scope in TIME_PROJECTIONS)]
    if attention:
        producer = {output: node for node in graph.node for output in node.output}
        for softmax in (n for n in graph.node if n.op_type == "Softmax" and "/attn" in n.name):
            keep.append(softmax.name)
            scores = producer.get(softmax.input[0])
            if scores is None or scores.op_type != "MatMul":
                continue
            keep.append(scores.name)
            keep.extend(p.name for p in (producer.get(i) for i in scores.input) if p is not None and p.op_type == "Mul")
    return keep


def drop_round_trips(graph: onnx.GraphProto) -> int:
    """Remove the fp32 → fp16 → fp32 Cast pairs that the converter puts between two blocked nodes (a
    blocked MatMul feeding a blocked Softmax): the fp16 step would overflow just what stays fp32 to avoid
    it. Returns how many pairs it removed."""
    producer = {output: node for node in graph.node for output in node.output}
    outputs = {o.name for o in graph.output}
    renamed: dict[str, str] = {}
    for node in graph.node:
        first = producer.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if (first is not None and first.op_type == "Cast" and _cast_to(node) == onnx.TensorProto.FLOAT
                and _cast_to(first) == onnx.TensorProto.FLOAT16 and node.output[0] not in outputs
                and _is_float32(graph, first.input[0], producer)):
            renamed[node.output[0]] = first.input[0]
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    used = {name for node in graph.node for name in node.input} | outputs
    keep = [n for n in graph.node if not (n.op_type == "Cast" and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(keep)
    return len(renamed)


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _is_float32(graph: onnx.GraphProto, name: str, producer: dict[str, onnx.NodeProto]) -> bool:
    """Whether `name` is fp32 as far as the converter's own Casts say (their names end in _cast_to_fp16)."""
    value = next((v for v in (*graph.value_info, *graph.input) if v.name == name), None)
    if value is not None:
        return value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    source = producer.get(name)
    return source is not None and source.op_type == "Cast" and _cast_to(source) == onnx.TensorProto.FLOAT
