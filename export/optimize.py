"""ONNX Runtime's transformer optimizer on a traced graph (`export --optimize cpu|cuda`), before fp16.

The optimizer's Python fusions turn the traced subgraphs into ONNX Runtime's contrib operators:
MultiHeadAttention, LayerNormalization/SkipLayerNormalization and Gelu run on every provider (the `cpu`
target), while GroupNorm, SkipGroupNorm, NhwcConv, BiasSplitGelu, BiasAdd and packed QKV/KV attention
have CUDA kernels only (the `cuda` target, as ONNX Runtime's own Stable Diffusion pipeline does). Fusions
must run before the fp16 conversion: the converter's Casts break the patterns they match.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

log = logging.getLogger("sdserve.export")

Target = Literal["none", "cpu", "cuda"]
TARGETS: tuple[str, ...] = ("none", "cpu", "cuda")
MODEL_TYPES = {"text_encoder": "clip", "text_encoder_2": "clip", "unet": "unet", "vae_encoder": "vae",
               "vae_decoder": "vae"}
# Fusions whose operators have no CPU kernel in ONNX Runtime: on only for the cuda target.
CUDA_ONLY_FUSIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                     "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")
# Their operators (packed attention is a MultiHeadAttention fed packed inputs: its CPU kernel refuses them).
CUDA_ONLY_OPS = frozenset({"GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd"})


def needs_cuda(model: onnx.ModelProto) -> bool:
    """Whether the graph holds an operator that only ONNX Runtime's CUDA provider runs."""
    return any(n.domain == "com.microsoft" and n.op_type in CUDA_ONLY_OPS for n in model.graph.node)


def optimize(path: Path, component: str, target: Target, fp16: bool = False,
             fp32_attention: bool = False) -> onnx.ModelProto:
    """The graph at `path` with the fusions for `target` applied (the file itself is left as it is), for a
    graph converted to fp16 next if `fp16`. With `fp32_attention` (SD 2.x in fp16, see export.precision)
    attention stays unfused, so that its scores and softmax can stay fp32."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = MODEL_TYPES[component]
    options = FusionOptions(model_type)
    for name in CUDA_ONLY_FUSIONS:
        if hasattr(options, name):
            setattr(options, name, target == "cuda")
    # Packed Q/K/V inputs only for fp16, as ONNX Runtime's own Stable Diffusion pipeline does.
    options.enable_packed_qkv = options.enable_packed_kv = target == "cuda" and fp16
    options.enable_attention = not (fp16 and fp32_attention)
    try:
        with _one_element_head_counts():
            optimized = _run(optimize_model, path, model_type, options, target)
    except TypeError as exc:  # an attention fusion failing some other way: keep the other fusions
        log.warning("    %s: attention not fused (onnxruntime's fusion fails under numpy %s: %s)", component,
                    np.__version__, exc)
        options.enable_attention = False
        optimized = _run(optimize_model, path, model_type, options, target)
    model = optimized.model
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


def _run(optimize_model: Callable[..., Any], path: Path, model_type: str, options: object, target: Target) -> Any:
    # opt_level 0: Python fusions only. ONNX Runtime's own graph optimizations are provider-specific and
    # run at session creation anyway; baked in here they would tie a CPU graph to this machine's kernels.
    logging.disable(logging.INFO)  # its modules log every fusion pass at INFO, under their bare names
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optimize_model(str(path), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                                  optimization_options=options, use_gpu=target == "cuda")
    finally:
        logging.disable(logging.NOTSET)
