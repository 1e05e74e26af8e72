"""Tracing pipeline components into ONNX graphs with the common (optimum) input/output names.

One `Graph` per component: the module to trace, its named inputs with dynamic axes, and a way to draw
random inputs of any shape (used both to trace and, at other shapes, to verify the export).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from export import optimize, precision
from export.errors import ExportError

EXTERNAL_DATA_FILE = "model.onnx_data"
# Protobuf cannot hold a graph over 2 GB; larger graphs keep their weights in one side file.
PROTOBUF_LIMIT = 2**31 - 1
INLINE_LIMIT = 1024  # bytes: a graph with a side file keeps only smaller weights in itself


@dataclass(frozen=True)
class Shape:
    """The free dimensions a graph is traced or checked at."""

    batch: int
    latent_height: int
    latent_width: int
    sequence: int = 77


@dataclass
class Graph:
    name: str  # component key: text_encoder, text_encoder_2, unet, vae_encoder, vae_decoder
    module: torch.nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    make_inputs: Callable[[Shape, torch.Generator], dict[str, torch.Tensor]]
    keep_fp32_inputs: tuple[str, ...] = ()  # float inputs that stay fp32 in an fp16 graph
    fp32_attention: bool = False  # attention scores stay fp32 in an fp16 graph (SD 2.x: export.precision)

    def inputs(self, shape: Shape, seed: int) -> dict[str, torch.Tensor]:
        return self.make_inputs(shape, torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = self.module(*inputs.values())
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return dict(zip(self.output_names, outputs, strict=True))


BATCH = "batch"


class _TextEncoder(torch.nn.Module):
    """Returns the encoder's main outputs followed by every layer's hidden states (SDXL needs the
    penultimate one)."""

    def __init__(self, model: torch.nn.Module, first_outputs: tuple[str, str]) -> None:
        super().__init__()
        self.model, self.first_outputs = model, first_outputs

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        return (*(out[name] for name in self.first_outputs), *out.hidden_states)


def text_encoder(name: str, model: torch.nn.Module) -> Graph:
    config = model.config
    first = ("text_embeds", "last_hidden_state") if hasattr(model, "text_projection") else (
        "last_hidden_state", "pooler_output")
    layers = [f"hidden_states.{i}" for i in range(config.num_hidden_layers + 1)]
    seq = {0: BATCH, 1: "sequence"}
    axes = {"input_ids": seq, **{n: seq for n in (*first, *layers) if n not in ("text_embeds", "pooler_output")}}
    axes.update({n: {0: BATCH} for n in first if n in ("text_embeds", "pooler_output")})

    def make(shape: Shape, gen: torch.Generator) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, config.vocab_size, (shape.batch, shape.sequence), generator=gen, dtype=torch.int32)
        ends = torch.randint(1, shape.sequence, (shape.batch,), generator=gen)
        ids[:, 0] = config.bos_token_id
        ids[torch.arange(shape.batch), ends] = config.eos_token_id  # the pooled output reads the eos position
        return {"input_ids": ids}

    return Graph(name, _TextEncoder(model, first), ["input_ids"], [*first, *layers], axes, make)


class _UNet(torch.nn.Module):
    """The UNet with its inputs in graph order: SDXL's pooled text and time ids, then (with ControlNet
    residual inputs) one residual per down-block output and the mid block's."""

    def __init__(self, unet: torch.nn.Module, sdxl: bool, residuals: int) -> None:
        super().__init__()
        self.unet, self.sdxl, self.residuals = unet, sdxl, residuals

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *more: torch.Tensor) -> torch.Tensor:
        added = {"text_embeds": more[0], "time_ids": more[1]} if self.sdxl else None
        more = more[2:] if self.sdxl else more
        control = {}
        if self.residuals:
            control = {"down_block_additional_residuals": more[:self.residuals - 1],
                       "mid_block_additional_residual": more[self.residuals - 1]}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False,
                         **control)[0]


def unet(model: torch.nn.Module, text_embeds_dim: int | None, fp32_attention: bool = False,
         controlnet: bool = False) -> Graph:
    """The UNet; SDXL's (`text_embeds_dim` set) also takes the pooled text embedding and the time ids, and
    with `controlnet` it takes the ControlNet residuals (`residual_specs`) after them.
    `fp32_attention` (or the config's `upcast_attention`) keeps attention scores fp32 in fp16 graphs."""
    config = model.config
    spatial = {0: BATCH, 2: "height", 3: "width"}
    names = ["sample", "timestep", "encoder_hidden_states"]
    axes = {"sample": spatial, "timestep": {0: BATCH}, "encoder_hidden_states": {0: BATCH, 1: "sequence"},
            "out_sample": spatial}
    time_ids = 0
    if text_embeds_dim is not None:
        time_ids = (config.projection_class_embeddings_input_dim - text_embeds_dim) // config.addition_time_embed_dim
        names += ["text_embeds", "time_ids"]
        axes |= {"text_embeds": {0: BATCH}, "time_ids": {0: BATCH}}
    residuals = residual_specs(config) if controlnet else []
    names += [r.name for r in residuals]
    axes |= {r.name: r.axes for r in residuals}

    def make(shape: Shape, gen: torch.Generator) -> dict[str, torch.Tensor]:
        b, h, w = shape.batch, shape.latent_height, shape.latent_width
        inputs = {
            "sample": torch.randn(b, config.in_channels, h, w, generator=gen),
            "timestep": torch.rand(b, generator=gen) * 999,
            "encoder_hidden_states": torch.randn(b, shape.sequence, config.cross_attention_dim, generator=gen),
        }
        if time_ids:
            inputs["text_embeds"] = torch.randn(b, text_embeds_dim, generator=gen)
            size = [h * 8, w * 8, 0, 0, h * 8, w * 8][:time_ids]
            inputs["time_ids"] = torch.tensor([size] * b, dtype=torch.float32)
        for residual in residuals:
            inputs[residual.name] = torch.randn(residual.shape(b, h, w), generator=gen) * 0.5
        return inputs

    # fp16 cannot tell 985.5 from 985.6: timesteps (and the small time ids) stay fp32.
    return Graph("unet", _UNet(model, time_ids > 0, len(residuals)), names, ["out_sample"], axes, make,
                 keep_fp32_inputs=("timestep", "time_ids"),
                 fp32_attention=fp32_attention or bool(getattr(config, "upcast_attention", False)))


@dataclass(frozen=True)
class Residual:
    """One ControlNet residual: a UNet input (export --controlnet) and the same-named ControlNet output,
    `channels` wide at 1/2**`level` of the latent's height and width."""

    name: str
    channels: int
    level: int

    @property
    def axes(self) -> dict[int, str]:
        scale = "" if self.level == 0 else f"/{2 ** self.level}"
        return {0: BATCH, 2: f"height{scale}", 3: f"width{scale}"}

    def shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        for _ in range(self.level):  # the UNet's stride-2 convolutions round up
            height, width = -(-height // 2), -(-width // 2)
        return batch, self.channels, height, width


def residual_specs(config: object) -> list[Residual]:
    """The residuals a UNet (or ControlNet) config adds up, in the order diffusers passes them: conv_in's
    output, each down block's resnet outputs and downsampler, then the mid block's (named last)."""
    channels = list(config.block_out_channels)
    per_block = config.layers_per_block
    per_block = list(per_block) if isinstance(per_block, list | tuple) else [per_block] * len(channels)
    down = [(channels[0], 0)]
    for level, (width, layers) in enumerate(zip(channels, per_block, strict=True)):
        down += [(width, level)] * layers
        if level < len(channels) - 1:
            down.append((width, level + 1))
    specs = [Residual(f"down_block_residual.{i}", width, level) for i, (width, level) in enumerate(down)]
    return [*specs, Residual("mid_block_residual", channels[-1], len(channels) - 1)]


class _VaeEncoder(torch.nn.Module):
    """Image → the latent distribution's parameters (mean and log-variance, stacked on channels)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        moments = self.vae.encoder(sample)
        return self.vae.quant_conv(moments) if self.vae.quant_conv is not None else moments


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


def vae_encoder(vae: torch.nn.Module, scale: int) -> Graph:
    spatial = {0: BATCH, 2: "height", 3: "width"}

    def make(shape: Shape, gen: torch.Generator) -> dict[str, torch.Tensor]:
        size = (shape.batch, 3, shape.latent_height * scale, shape.latent_width * scale)
        return {"sample": torch.rand(size, generator=gen) * 2 - 1}

    return Graph("vae_encoder", _VaeEncoder(vae), ["sample"], ["latent_parameters"],
                 {"sample": spatial, "latent_parameters": spatial}, make)


def vae_decoder(vae: torch.nn.Module) -> Graph:
    spatial = {0: BATCH, 2: "height", 3: "width"}
    channels = vae.config.latent_channels

    def make(shape: Shape, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {"latent_sample": torch.randn(shape.batch, channels, shape.latent_height, shape.latent_width,
                                             generator=gen)}

    return Graph("vae_decoder", _VaeDecoder(vae), ["latent_sample"], ["sample"],
                 {"latent_sample": spatial, "sample": spatial}, make)


def trace(graph: Graph, inputs: dict[str, torch.Tensor], folder: Path, opset: int, precision: str,
          optimize_for: str = "none") -> None:
    """Write `folder/model.onnx` (plus `model.onnx_data` for graphs over 2 GB) and check it.

    Always traced in fp32: PyTorch's CPU half kernels trace into graphs of mixed types. With `optimize_for`
    cpu or cuda, ONNX Runtime's transformer optimizer fuses the graph first (`export.optimize`). An fp16
    graph is converted afterwards by ONNX Runtime's float16 converter, keeping `keep_fp32_inputs` and the
    nodes of `export.precision.fp32_nodes` in fp32.
    """
    scratch = folder / "trace"
    scratch.mkdir(parents=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes
        torch.onnx.export(
            graph.module,
            tuple(inputs.values()),
            str(scratch / "model.onnx"),
            input_names=graph.input_names,
            output_names=graph.output_names,
            dynamic_axes={k: v for k, v in graph.dynamic_axes.items() if k in graph.input_names + graph.output_names},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    finish(scratch / "model.onnx", folder, graph, precision, optimize_for)


def finish(traced: Path, folder: Path, graph: Graph, precision: str, optimize_for: str = "none") -> None:
    """Turn the graph the tracer wrote (`traced`, with its weights beside it: one file per weight over 2 GB)
    into `folder/model.onnx`: fused for `optimize_for`, converted to fp16 for `precision`, its external
    weights gathered into one file; the tracer's folder is removed."""
    scratch = traced.parent
    if optimize_for != "none":
        fused = optimize.optimize(traced, graph.name, optimize_for, fp16=precision == "fp16",
                                  fp32_attention=graph.fp32_attention)
        _save(fused, traced)
    if precision == "fp16":
        _convert_to_fp16(traced, list(graph.keep_fp32_inputs), graph.fp32_attention)
    _merge_external_data(scratch, folder)
    shutil.rmtree(scratch)
    try:
        onnx.checker.check_model(str(folder / "model.onnx"))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{graph.name}: the traced graph fails onnx.checker: {exc}") from exc


def _convert_to_fp16(path: Path, keep_fp32: list[str], fp32_attention: bool) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    blocked = precision.fp32_nodes(onnx.load(str(path), load_external_data=False).graph, fp32_attention)
    model = convert_float_to_float16(str(path), keep_io_types=keep_fp32 or False, node_block_list=blocked)
    precision.drop_round_trips(model.graph)
    _sort_nodes(model.graph)
    _save(model, path)


def _save(model: onnx.ModelProto, path: Path) -> None:
    """Replace the scratch folder's graph with `model`, and its weight files with the ones `model` reads
    (an optimized graph still reads the tracer's files; the weights in it go to a file of their own)."""
    kept = {ExternalDataInfo(t).location for t in _initializers(model) if uses_external_data(t)}
    for stale in path.parent.iterdir():
        if stale.name not in kept:
            stale.unlink()
    weights = sum(len(t.raw_data) for t in _initializers(model))
    if weights < PROTOBUF_LIMIT and not kept:
        onnx.save_model(model, str(path))
    else:
        location = next(f"weights-{n}.bin" for n in range(len(kept) + 1) if f"weights-{n}.bin" not in kept)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=INLINE_LIMIT)


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """The converter appends its input casts at the end; ONNX requires producers before consumers."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        remaining = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            raise ExportError(f"graph {graph.name} has a cycle or a dangling input after fp16 conversion")
        pending = remaining
    del graph.node[:]
    graph.node.extend(ordered)


def _merge_external_data(scratch: Path, folder: Path) -> None:
    """Over 2 GB the exporter writes one file per weight (hundreds), and `_save` the weights the optimizer
    added into one more; gather them into one file by streaming, so that memory stays at one tensor, and
    point the graph at the new offsets."""
    model = onnx.load(str(scratch / "model.onnx"), load_external_data=False)
    external = [t for t in _initializers(model) if uses_external_data(t)]
    if not external:
        shutil.move(scratch / "model.onnx", folder / "model.onnx")
        return
    with open(folder / EXTERNAL_DATA_FILE, "wb") as data:
        for tensor in external:
            info = ExternalDataInfo(tensor)
            with open(scratch / info.location, "rb") as part:
                part.seek(info.offset or 0)
                blob = part.read(info.length) if info.length else part.read()
            data.write(b"\0" * (-data.tell() % 4096))  # page-aligned, so runtimes can map the weights
            offset = data.tell()
            data.write(blob)
            del tensor.external_data[:]
            for key, value in (("location", EXTERNAL_DATA_FILE), ("offset", offset), ("length", len(blob))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
    onnx.save_model(model, str(folder / "model.onnx"))


def _initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
    return tensors
