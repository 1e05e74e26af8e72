"""LoRA-capable graphs (`--lora-rank R`): every layer that LoRA adapters target gets a low-rank branch whose
matrices are graph inputs, so that one graph applies any mix of adapters per run without touching its weights.

    y = W·x + up·(down·x)      down: (in, r) and up: (r, out) for linear layers,
                               down: (r, in, 1, 1) and up: (out, r, 1, 1) for 1×1 convolutions

`r` is the dynamic axis `lora_rank`: several adapters are concatenated along it, with their scales folded
into `up`, and a run without adapters feeds zeros of rank 1. The targets are the layers diffusers/PEFT
and kohya adapters train: every linear (and 1×1 convolution) inside the UNet's transformer blocks
(`…attentions.N.proj_in/proj_out`, `attn1/attn2.to_q/to_k/to_v/to_out.0`, `ff.net.0.proj`, `ff.net.2`)
and every linear of the CLIP encoder layers (`self_attn.q/k/v/out_proj`, `mlp.fc1/fc2`).
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
import torch.nn.functional as F

from export.graphs import Graph, Shape

RANK_AXIS = "lora_rank"
DOWN, UP = ".lora_down", ".lora_up"
_UNET_TARGET = re.compile(r"\.attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.("
                          r"attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))$")
_TEXT_TARGET = re.compile(r"^(text_model\.)?encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


class _Inputs:
    """The current run's LoRA matrices by layer, set by the graph's forward before the model runs."""

    def __init__(self) -> None:
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


class _Branch(torch.nn.Module):
    def __init__(self, base: torch.nn.Module, name: str, inputs: _Inputs) -> None:
        super().__init__()
        self.base, self.name, self.inputs = base, name, inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.inputs.tensors[self.name]
        if isinstance(self.base, torch.nn.Conv2d):
            return self.base(x) + F.conv2d(F.conv2d(x, down), up)
        return self.base(x) + torch.matmul(torch.matmul(x, down), up)


class _WithLora(torch.nn.Module):
    """The component's module, taking its own inputs first and then (down, up) for every target layer."""

    def __init__(self, module: torch.nn.Module, base_inputs: int, layers: list[str], inputs: _Inputs) -> None:
        super().__init__()
        self.module, self.base_inputs, self.layers, self.lora_inputs = module, base_inputs, layers, inputs

    def forward(self, *args: torch.Tensor) -> object:
        base, matrices = args[:self.base_inputs], args[self.base_inputs:]
        self.lora_inputs.tensors = {name: (matrices[2 * i], matrices[2 * i + 1]) for i, name in enumerate(self.layers)}
        try:
            return self.module(*base)
        finally:
            self.lora_inputs.tensors = {}


def targets(graph_name: str, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers of a component's model that get a branch, by module path."""
    pattern = _UNET_TARGET if graph_name == "unet" else _TEXT_TARGET
    found = {}
    for name, module in model.named_modules():
        if not pattern.search(name):
            continue
        if isinstance(module, torch.nn.Linear) or (
                isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1):
            found[name] = module
    return found


def with_lora(graph: Graph, model: torch.nn.Module) -> Graph:
    """`graph` with a LoRA branch on every target layer of `model` (the diffusers or transformers module it
    wraps, changed in place). Random inputs draw rank batch + 1, so that trace and check differ in rank."""
    layers = targets(graph.name, model)
    if not layers:
        return graph
    inputs = _Inputs()
    for name, module in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _Branch(module, name, inputs))
    names = list(layers)
    lora_names = [f"{name}{end}" for name in names for end in (DOWN, UP)]
    axes = {}
    for name, module in layers.items():
        conv = isinstance(module, torch.nn.Conv2d)
        axes[name + DOWN] = {0: RANK_AXIS} if conv else {1: RANK_AXIS}
        axes[name + UP] = {1: RANK_AXIS} if conv else {0: RANK_AXIS}

    def make(shape: Shape, gen: torch.Generator) -> dict[str, torch.Tensor]:
        rank = shape.batch + 1
        drawn = graph.make_inputs(shape, gen)
        for name, module in layers.items():
            down, up = _shapes(module, rank)
            drawn[name + DOWN] = torch.randn(down, generator=gen) * 0.1
            drawn[name + UP] = torch.randn(up, generator=gen) * 0.1
        return drawn

    module = _WithLora(graph.module, len(graph.input_names), names, inputs)
    return replace(graph, module=module, input_names=[*graph.input_names, *lora_names],
                   dynamic_axes={**graph.dynamic_axes, **axes}, make_inputs=make)


def _shapes(module: torch.nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if isinstance(module, torch.nn.Conv2d):
        return (rank, module.in_channels, 1, 1), (module.out_channels, rank, 1, 1)
    return (module.in_features, rank), (rank, module.out_features)
