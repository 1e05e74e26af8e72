"""`export --optimize`: ONNX Runtime's transformer fusions on the tiny models."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import engines
from engines import manifest as mf
from export import ExportSettings, export_model, graphs, optimize, presets, source
from export import __main__ as export_cli

Model = Callable[[str], Path]


def _fused(root: Path, component: str) -> set[str]:
    graph = onnx.load(str(root / component / "model.onnx"), load_external_data=False).graph
    return {n.op_type for n in graph.node if n.domain == "com.microsoft"}


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_cpu_optimized_model_renders_like_the_raw_one(name: str, tiny_model: Model, tmp_path: Path) -> None:
    raw = tmp_path / name
    export_model(ExportSettings(preset=name, output=str(raw), optimize="none"))
    optimized = tiny_model(name)  # the default (auto) for an fp32 export: the CPU fusions
    manifest = mf.read(optimized)
    assert {c.optimized_for for c in manifest.components.values()} == {"cpu"}
    assert {c.optimized_for for c in mf.read(raw).components.values()} == {None}
    # the optimizer really changed the graph, attention included (onnxruntime 1.32 + numpy 2.4 need our workaround)
    assert {"SkipLayerNormalization", "MultiHeadAttention"} <= _fused(optimized, "unet")
    # self-attention too runs as MultiHeadAttention (flash attention on the CPU), not as Attention (whose
    # CPU kernel holds every head's whole score matrix)
    assert "Attention" not in _fused(optimized, "unet")
    request = engines.RenderRequest(prompt="a red bicycle", negative_prompt="blur", width=128, height=128,
                                    steps=3, guidance_scale=6.0, sampler="euler", seed=5)
    latents = np.random.default_rng(7).standard_normal((1, 4, 16, 16)).astype(np.float32)
    before = engines.load(raw, backend="cpu").render(request, latents=latents).pixels
    after = engines.load(optimized, backend="cpu").render(request, latents=latents).pixels
    assert float(np.abs(after - before).max()) < 1e-4


def test_cuda_optimized_model_is_refused_on_the_cpu_backend_in_one_line(tmp_path: Path) -> None:
    target = tmp_path / "tiny-sd15-cuda"
    report = export_model(ExportSettings(preset="tiny-sd15", output=str(target), optimize="cuda"))
    manifest = mf.read(target)
    assert manifest.components["unet"].optimized_for == "cuda"
    assert "GroupNorm" in _fused(target, "unet")
    # the text encoder gains no CUDA-only operator: it stays checked against PyTorch
    assert manifest.components["text_encoder"].optimized_for == "cpu"
    checked = {c.name: not np.isnan(c.max_diff) for c in report.components}
    assert checked == {"text_encoder": True, "unet": False, "vae_encoder": False, "vae_decoder": False}
    with pytest.raises(engines.EngineFailure) as refused:
        engines.load(target, backend="cpu")
    assert "--optimize cuda" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(engines.EngineFailure) as auto:  # here auto has only the CPU to try
        engines.load(target, backend="auto")
    assert "--optimize cuda" in str(auto.value)


def test_a_manifest_from_before_the_field_still_reads(tiny_model: Model, tmp_path: Path) -> None:
    raw = json.loads((tiny_model("tiny-sd15") / mf.MANIFEST_FILE).read_bytes())
    for component in raw["components"].values():
        del component["optimized_for"]
    manifest = msgspec.json.decode(json.dumps(raw), type=mf.Manifest)
    assert {c.optimized_for for c in manifest.components.values()} == {None}


def test_tensorrt_plans_refuse_optimized_graphs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from export.__main__ import main

    assert main(["tiny-sd15", "--optimize", "cpu", "--tensorrt", "--output", str(tmp_path / "m")]) == 2
    assert "drop --optimize" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_graph_with_external_weights_is_optimized_without_loading_them(tmp_path: Path) -> None:
    """Over 2 GB the tracer writes one file per weight; the optimizer reads only the weights it merges
    (SD 1.5's UNet: 1 GiB of memory instead of 17), and the result equals optimizing the graph in memory."""
    graph = graphs.unet(source.random_pipeline(presets.get("tiny-sd15")).unet, None)
    graphs.trace(graph, graph.inputs(graphs.Shape(2, 16, 16), seed=0), tmp_path / "raw", 17, "fp32")
    in_memory = tmp_path / "in-memory" / "trace" / "model.onnx"
    on_disk = tmp_path / "on-disk" / "trace" / "model.onnx"
    for traced in (in_memory, on_disk):
        traced.parent.mkdir(parents=True)
    raw = onnx.load(str(tmp_path / "raw" / "model.onnx"))
    onnx.save_model(raw, str(in_memory))
    # the layout of the tracer over 2 GB: every weight in a file of its own beside the graph
    onnx.save_model(raw, str(on_disk), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    weights = {t.name for t in raw.graph.initializer}

    fused = optimize.optimize(on_disk, "unet", "cpu")
    inline = {t.name for t in fused.graph.initializer if t.HasField("raw_data")}
    assert inline and not inline & weights  # only what the fusions made is in memory, no weight of the trace
    assert {n.op_type for n in fused.graph.node if n.domain == "com.microsoft"} >= {"MultiHeadAttention"}

    outputs = []
    for traced in (in_memory, on_disk):
        graphs.finish(traced, traced.parent.parent, graph, "fp32", "cpu")
        assert not traced.parent.exists()
        session = ort.InferenceSession(str(traced.parent.parent / "model.onnx"), providers=["CPUExecutionProvider"])
        feeds = {name: tensor.numpy() for name, tensor in graph.inputs(graphs.Shape(1, 24, 16), seed=1).items()}
        outputs.append(session.run(None, feeds)[0])
    # one side file (page-aligned weights), the graph itself keeps no weight over the inline limit
    assert (on_disk.parent.parent / graphs.EXTERNAL_DATA_FILE).is_file()
    kept = onnx.load(str(on_disk.parent.parent / "model.onnx"), load_external_data=False).graph.initializer
    assert max(len(t.raw_data) for t in kept) < graphs.INLINE_LIMIT
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_auto_fuses_fp32_exports_for_the_cpu_and_leaves_gpu_exports_raw() -> None:
    assert optimize.choose("auto", "fp32") == "cpu"
    assert optimize.choose("auto", "fp16") == "none"  # made for GPUs: TensorRT plans need the raw graphs
    assert optimize.choose("cuda", "fp16") == "cuda" and optimize.choose("none", "fp32") == "none"
    cli = export_cli.parser()
    assert export_cli.settings_from(cli.parse_args(["tiny-sd15"])).optimize == "auto"
    assert export_cli.settings_from(cli.parse_args(["tiny-sd15", "--tensorrt"])).optimize == "none"
    assert export_cli.settings_from(cli.parse_args(["tiny-sd15", "--tensorrt", "--optimize", "cpu"])).optimize == "cpu"
