"""ONNX Runtime's transformer optimizer on a traced graph (`export --optimize cpu|cuda`), before fp16.

The optimizer's Python fusions turn the traced subgraphs into ONNX Runtime's contrib operators:
MultiHeadAttention, LayerNormalization/SkipLayerNormalization and Gelu run on every provider (the `cpu`
target), while GroupNorm, SkipGroupNorm, NhwcConv, BiasSplitGelu, BiasAdd and packed QKV/KV attention
have CUDA kernels only (the `cuda` target, as ONNX Runtime's own Stable Diffusion pipeline does). Fusions
must run before the fp16 conversion: the converter's Casts break the patterns they match.

Weights stay on disk: the graph is loaded without its external data, and the few weights a fusion reads
(attention's Q, K and V, to merge them) are read from the files beside it. Loading them all made the
optimizer peak at 17 GiB on SD 1.5's 3.4 GB UNet (it copies the model for shape inference); without
them it peaks at about 1 GiB.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger("sdserve.export")

Target = Literal["none", "cpu", "cuda"]
Choice = Literal["auto", "none", "cpu", "cuda"]  # what `export --optimize` takes: a target, or auto
CHOICES: tuple[str, ...] = get_args(Choice)
MODEL_TYPES = {"text_encoder": "clip", "text_encoder_2": "clip", "unet": "unet", "vae_encoder": "vae",
               "vae_decoder": "vae", "tiny_vae_decoder": "vae", "controlnet": "unet"}
# Fusions whose operators have no CPU kernel in ONNX Runtime: on only for the cuda target.
CUDA_ONLY_FUSIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                     "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")
# Their operators (packed attention is a MultiHeadAttention fed packed inputs: its CPU kernel refuses them).
CUDA_ONLY_OPS = frozenset({"GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd"})


def choose(choice: Choice, precision: str) -> Target:
    """The target for `--optimize choice`. auto: the CPU fusions for fp32 graphs (on random-sd15 at 512², the
    whole render's memory growth 7024 → 5140 MiB and 28.4 → 24.5 s, README Performance; their operators
    run on CUDA too), none for fp16 graphs, which are made for GPUs: TensorRT plans need the standard
    operators, and the CUDA fusions are asked for by name (`cuda`; such a graph runs nowhere else)."""
    if choice != "auto":
        return choice
    return "cpu" if precision == "fp32" else "none"


def needs_cuda(model: onnx.ModelProto) -> bool:
    """Whether the graph holds an operator that only ONNX Runtime's CUDA provider runs."""
    return any(n.domain == "com.microsoft" and n.op_type in CUDA_ONLY_OPS for n in model.graph.node)


def optimize(path: Path, component: str, target: Target, fp16: bool = False,
             fp32_attention: bool = False) -> onnx.ModelProto:
    """The graph at `path` with the fusions for `target` applied (the file itself is left as it is), for a
    graph converted to fp16 next if `fp16`. With `fp32_attention` (SD 2.x in fp16, see export.precision)
    attention stays unfused, so that its scores and softmax can stay fp32. Weights the graph keeps in
    external files stay there (the model returned points at them, relative to `path`'s folder); weights
    the fusions create are in the model."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    from onnxruntime.transformers.fusion_options import FusionOptions

    model_type = MODEL_TYPES[component]
    options = FusionOptions(model_type)
    for name in CUDA_ONLY_FUSIONS:
        if hasattr(options, name):
            setattr(options, name, target == "cuda")
    # Packed Q/K/V inputs only for fp16, as ONNX Runtime's own Stable Diffusion pipeline does.
    options.enable_packed_qkv = options.enable_packed_kv = target == "cuda" and fp16
    options.enable_attention = not (fp16 and fp32_attention)
    path = path.resolve()
    # Where the fusions find the external weights they read (ONNX refuses absolute locations). The working
    # folder is the process's: nothing else in an export runs beside this, on another thread.
    with contextlib.chdir(path.parent):
        try:
            with _one_element_head_counts():
                model = _run(path, model_type, options, target)
        except TypeError as exc:  # an attention fusion failing some other way: keep the other fusions
            log.warning("    %s: attention not fused (onnxruntime's fusion fails under numpy %s: %s)", component,
                        np.__version__, exc)
            options.enable_attention = False
            model = _run(path, model_type, options, target)
        if target == "cpu":
            _split_self_attention(model)
        # The fp16 converter places its Casts into the nodes kept fp32 (SD 2.x attention) by each tensor's
        # value_info; ONNX's own inference stops at contrib operators, so infer types with ONNX Runtime's.
        del model.graph.value_info[:]
        model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):  # the fused operators' domain
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    fused = Counter(n.op_type for n in model.graph.node if n.domain == "com.microsoft")
    log.info("    %s optimized for %s: %s", component, target,
             ", ".join(f"{count} {op}" for op, count in sorted(fused.items())) or "nothing fused")
    return model


@contextmanager
def _one_element_head_counts() -> Iterator[None]:
    """onnxruntime 1.32's UNet attention fusion reads the head count with int() on a one-element array,
    which numpy 2.4 refuses (TypeError), so no attention would fuse: for this call only, read such an
    array's one item instead. The optimizer imports its modules by bare name (its folder is on sys.path)."""
    import onnxruntime.transformers.optimizer  # noqa: F401  (imports the fusions, under their bare names)

    fusion = sys.modules.get("fusion_attention_unet")
    cls = getattr(fusion, "FusionAttentionUnet", None)
    if cls is None:
        yield
        return
    original = cls.get_num_heads

    def get_num_heads(self: Any, reshape_q: onnx.NodeProto, is_torch2: bool = False) -> int:
        try:
            return original(self, reshape_q, is_torch2)
        except TypeError:
            concat = self.model.get_parent(reshape_q, 1)  # the shape [0, 0, heads, head_size]
            heads = self.model.get_constant_value(concat.input[2]) if concat is not None else None
            return int(heads.item()) if isinstance(heads, np.ndarray) and heads.size == 1 else 0

    cls.get_num_heads = get_num_heads
    try:
        yield
    finally:
        cls.get_num_heads = original


def _split_self_attention(model: onnx.ModelProto) -> None:
    """Rewrite each fused self-attention (`Attention`: one merged Q|K|V weight) as three MatMuls and a
    `MultiHeadAttention`. ONNX Runtime's CPU kernel for `Attention` computes every head's
    whole score matrix (one SD 1.5 UNet call at 512×512: 2 × 8 × 4096² floats, 1 GiB), while its
    `MultiHeadAttention` kernel, given separate Q, K and V, runs flash attention: measured on one such
    attention, 1149 MB against 85 MB of peak memory, 0.43 s against 0.16 s, outputs within 1.2e-7."""
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    merged_weights = set()
    for node in graph.node:
        plain = {a.name for a in node.attribute} == {"num_heads"} and len(node.input) == 3
        if not (node.domain == "com.microsoft" and node.op_type == "Attention" and plain and node.input[1] in weights):
            nodes.append(node)
            continue
        merged = numpy_helper.to_array(weights[node.input[1]])  # [hidden in, 3 × hidden]: Q | K | V
        projected = []
        for part, name in zip(np.split(merged, 3, axis=1), "QKV", strict=True):
            weight = numpy_helper.from_array(np.ascontiguousarray(part), f"{node.name}_{name}_weight")
            graph.initializer.append(weight)
            projected.append(f"{node.name}_{name}")
            nodes.append(onnx.helper.make_node("MatMul", [node.input[0], weight.name], [projected[-1]],
                                               name=f"{node.name}_MatMul_{name}"))
        heads = onnx.helper.get_attribute_value(node.attribute[0])
        nodes.append(onnx.helper.make_node("MultiHeadAttention", [*projected, node.input[2]], list(node.output),
                                           name=node.name, domain="com.microsoft", num_heads=heads))
        merged_weights.add(node.input[1])
    del graph.node[:]
    graph.node.extend(nodes)
    unused = merged_weights - {name for node in nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _run(path: Path, model_type: str, options: object, target: Target) -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model

    # Loaded here, each time: a fusion failing half way leaves the model it was given half rewritten.
    model = onnx.load(str(path), load_external_data=False)
    # opt_level 0: Python fusions only. ONNX Runtime's own graph optimizations are provider-specific and
    # run at session creation anyway; baked in here they would tie a CPU graph to this machine's kernels.
    logging.disable(logging.INFO)  # its modules log every fusion pass at INFO, under their bare names
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optimize_model(model, model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                                  optimization_options=options, use_gpu=target == "cuda").model
    finally:
        logging.disable(logging.NOTSET)
