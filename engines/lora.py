"""LoRA per render: adapters matched to a model's LoRA inputs, and fed with each render's scales.

A model exported with `--lora-rank R` has, for every adapted layer of its text encoders and UNet, the
inputs `<layer>.lora_down` and `<layer>.lora_up` (`export.lora`). A render with adapters [(a, sa), (b, sb)]
feeds each layer down = [down_a | down_b] and up = [sa·α_a/r_a·up_a ; sb·α_b/r_b·up_b] along the rank
axis, which computes W·x + Σ sᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ·x: exactly diffusers' `set_adapters(names, weights)`. No
weight is changed and no session is rebuilt; a render without adapters feeds zeros of rank 1.

The feeds of the current render live in a context variable that `LoraSession` adds to every run of its
component: renders on other threads (the server's render slots) each see only their own adapters, and
the pipeline's stages need not carry them.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines import adapter as lora_file
from engines import manifest as mf
from engines.backends.base import Session
from engines.errors import InvalidRequest
from engines.info import AdapterInfo

log = logging.getLogger("sdserve.engines")

MAX_ADAPTERS = 8
MAX_SCALE = 4.0
DOWN, UP = ".lora_down", ".lora_up"
Feeds = dict[str, dict[str, np.ndarray]]  # component → input name → array
_ACTIVE: ContextVar[Feeds | None] = ContextVar("sdserve_lora_feeds", default=None)


@dataclass(frozen=True)
class Slot:
    """One adapted layer of a graph: a linear layer (in → out) or a 1×1 convolution."""

    conv: bool
    width_in: int
    width_out: int

    def zeros(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        if self.conv:
            return (np.zeros((rank, self.width_in, 1, 1), np.float32),
                    np.zeros((self.width_out, rank, 1, 1), np.float32))
        return np.zeros((self.width_in, rank), np.float32), np.zeros((rank, self.width_out), np.float32)


@dataclass(frozen=True)
class Fitted:
    """An adapter matched to one model: per component its rank and each layer's feeds (unscaled by the
    request, scaled by α/r), already in the graph's layout and padded to that rank."""

    info: AdapterInfo
    ranks: dict[str, int]
    feeds: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]


def slots(manifest: mf.Manifest) -> dict[str, dict[str, Slot]]:
    """The adapted layers of each LoRA-capable component, read from the graph signatures."""
    found: dict[str, dict[str, Slot]] = {}
    for key, component in manifest.components.items():
        shapes = {t.name: t.shape for t in component.inputs}
        for name, down in shapes.items():
            if name.endswith(DOWN):
                layer, up = name[: -len(DOWN)], shapes[name[: -len(DOWN)] + UP]
                conv = len(down) == 4
                found.setdefault(key, {})[layer] = Slot(conv, int(down[1] if conv else down[0]),
                                                        int(up[0] if conv else up[1]))
    return found


def fit(adapter: lora_file.Adapter, manifest: mf.Manifest, layers: dict[str, dict[str, Slot]]) -> Fitted:
    """`adapter` on this model's layers, or AdapterRefused naming the first mismatch."""
    ranks, feeds = {}, {}
    for part, entries in adapter.layers.items():
        if part not in layers:
            raise lora_file.AdapterRefused(f"it changes {part}, which this {manifest.family} model does not "
                                           "have (an adapter for another family?)")
        names = _names(part, layers[part], manifest)
        rank = max(layer.rank for layer in entries.values())
        ranks[part], feeds[part] = rank, {}
        for key, layer in entries.items():
            target = names.get(key)
            if target is None and re.search(r"attentions|transformer_blocks|encoder.layers", key):
                raise lora_file.AdapterRefused(f"it changes {part} layer {key}, which this {manifest.family} model "
                                               "does not have (an adapter for another family or model size)")
            if target is None:
                raise lora_file.AdapterRefused(
                    f"it changes {part} layer {key}, outside the layers this engine adapts (attention and "
                    "feed-forward linears, 1×1 projections): convolution LoRA (LoCon) cannot be applied")
            feeds[part][target] = _feed(layer, layers[part][target], rank, f"{part} layer {key}", manifest)
    info = AdapterInfo(name=adapter.name, rank=adapter.rank, parts=adapter.parts, format=adapter.format)
    return Fitted(info, ranks, feeds)


def _names(part: str, layers: dict[str, Slot], manifest: mf.Manifest) -> dict[str, str]:
    """Every spelling of each layer that adapter files use → the graph's layer name."""
    names = {}
    for layer in layers:
        spellings = [layer, layer.replace(".", "_")]
        if part != "unet":  # transformers 4 nests CLIP under text_model; kohya names keep it
            spellings += ["text_model." + layer, "text_model_" + layer.replace(".", "_")]
        elif manifest.lora is not None and (sgm := _sgm_name(layer, manifest.lora.layers_per_block)):
            spellings.append(sgm)
        names.update(dict.fromkeys(spellings, layer))
    return names


def _sgm_name(layer: str, per_block: int) -> str | None:
    """kohya's SDXL names follow the original (sgm) UNet: input_blocks_4_1_… for down_blocks.1.attentions.0."""
    match = re.match(r"^(down_blocks|mid_block|up_blocks)\.(?:(\d+)\.)?attentions\.(\d+)\.(.+)$", layer)
    if not match:
        return None
    kind, block, index, rest = match.group(1), int(match.group(2) or 0), int(match.group(3)), match.group(4)
    if kind == "down_blocks":
        prefix = f"input_blocks_{1 + block * (per_block + 1) + index}_1"
    elif kind == "mid_block":
        prefix = "middle_block_1"
    else:
        prefix = f"output_blocks_{block * (per_block + 1) + index}_1"
    return f"{prefix}_{rest.replace('.', '_')}"


def _feed(layer: lora_file.Layer, slot: Slot, rank: int, where: str,
          manifest: mf.Manifest) -> tuple[np.ndarray, np.ndarray]:
    down, up = layer.down.reshape(layer.rank, -1), layer.up.reshape(layer.up.shape[0], layer.rank)
    if down.shape[1] != slot.width_in or up.shape[0] != slot.width_out:
        raise lora_file.AdapterRefused(
            f"{where} maps {down.shape[1]} → {up.shape[0]} features, the {manifest.family} model's "
            f"{slot.width_in} → {slot.width_out} (an adapter for another family or model size)")
    pad = rank - layer.rank
    down = np.pad(down, ((0, pad), (0, 0)))
    up = np.pad(up * np.float32(layer.scale), ((0, 0), (0, pad)))
    if slot.conv:
        return down[:, :, None, None], up[:, :, None, None]
    return np.ascontiguousarray(down.T), np.ascontiguousarray(up.T)


@dataclass(frozen=True)
class Chosen:
    """One render's adapters: `key` is equal for renders whose feeds are equal (they may share a UNet
    call), `feeds` None without adapters."""

    key: tuple[tuple[str, int, float], ...]
    feeds: Feeds | None
    adapters: tuple[Fitted, ...]  # held, so that no reloaded adapter can take an id in `key` while it lives


class LoraSession(Session):
    """A LoRA-capable component: adds the current render's adapter feeds (or zeros) to every run."""

    def __init__(self, inner: Session, zeros: dict[str, np.ndarray]) -> None:
        super().__init__(inner.name, inner.component)
        self.inner, self.zeros, self.max_rows = inner, zeros, inner.max_rows
        self.ran_on = inner.ran_on  # the calls run where the inner session runs them

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        active = _ACTIVE.get()
        extra = active.get(self.name) if active else None
        return self.inner.run({**feeds, **(extra or self.zeros)}, outputs)

    def close(self) -> None:
        self.inner.close()


class Adapters:
    """The adapters one model offers, and the feeds each render's choice of them needs."""

    def __init__(self, model: str, manifest: mf.Manifest) -> None:
        self.model, self.manifest = model, manifest
        self.slots = slots(manifest)
        self.offered: dict[str, Fitted] = {}
        self.refused: dict[str, str] = {}

    @property
    def rank(self) -> int:
        return self.manifest.lora.rank if self.manifest.lora is not None and self.slots else 0

    def wrap(self, sessions: dict[str, Session]) -> dict[str, Session]:
        """Sessions of LoRA-capable components, wrapped so that every run gets LoRA feeds."""
        return {key: LoraSession(s, _zero_feeds(self.slots[key])) if key in self.slots else s
                for key, s in sessions.items()}

    def load(self, folder: str | Path | None) -> None:
        """(Re)read every `.safetensors` file of `folder`; each becomes offered or refused (logged)."""
        offered, refused = {}, {}
        for path in sorted(Path(folder).glob("*.safetensors")) if folder else []:
            try:
                if not self.rank:
                    raise lora_file.AdapterRefused(f"model '{self.model}' was exported without LoRA support "
                                                   "(export it with --lora-rank R)")
                offered[path.stem] = fit(lora_file.read(path), self.manifest, self.slots)
            except Exception as exc:  # a bad file costs its adapter, never the loading of the model
                refused[path.stem] = f"adapter '{path.stem}' does not fit model '{self.model}': {exc}"
                log.warning("%s", refused[path.stem])
        if folder and not Path(folder).is_dir():
            log.warning("LoRA directory %s does not exist: no adapters", folder)
        self.offered, self.refused = offered, refused
        if offered:
            log.info("%s: LoRA adapters %s", self.model, ", ".join(offered))

    def infos(self) -> list[AdapterInfo]:
        return [fitted.info for fitted in self.offered.values()]

    def choose(self, choice: Sequence[tuple[str, float]]) -> Chosen:
        """A render's adapters ([(name, scale), …]) checked, with the feeds its LoRA sessions take."""
        if not choice:
            return Chosen((), None, ())
        offered = self.offered  # one snapshot: a reload (`load`) may replace the dict meanwhile
        scales = self._check(choice, offered)
        chosen = [(offered[name], scale) for name, scale in scales.items()]
        key = tuple(sorted((fitted.info.name, id(fitted), scale) for fitted, scale in chosen))
        return Chosen(key, self._feeds(chosen), tuple(fitted for fitted, _ in chosen))

    @contextmanager
    def applied(self, chosen: Chosen) -> Iterator[None]:
        """Within this block, LoRA sessions on this thread run with `chosen`'s feeds."""
        token = _ACTIVE.set(chosen.feeds)
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def _feeds(self, chosen: list[tuple[Fitted, float]]) -> Feeds:
        feeds: Feeds = {}
        for part, layers in self.slots.items():
            using = [(f, s) for f, s in chosen if part in f.ranks]
            total = sum(f.ranks[part] for f, _ in using)
            if total > self.rank:
                raise InvalidRequest("lora", f"these adapters add up to rank {total} in {part}; model "
                                     f"'{self.model}' takes at most {self.rank} (its --lora-rank)")
            if using:
                feeds[part] = _concatenated(part, layers, using)
        return feeds

    def _check(self, choice: Sequence[tuple[str, float]], offered: dict[str, Fitted]) -> dict[str, float]:
        """Validated choice, repeated names summed (the same adapter twice is one at the summed scale)."""
        if not self.rank:
            raise InvalidRequest("lora", f"model '{self.model}' was exported without LoRA support; export it "
                                 "with `python -m export … --lora-rank R` to use adapters")
        if len(choice) > MAX_ADAPTERS:
            raise InvalidRequest("lora", f"{len(choice)} adapters; at most {MAX_ADAPTERS} per request")
        scales: dict[str, float] = {}
        for name, scale in choice:
            if not isinstance(scale, int | float) or not math.isfinite(scale) or abs(scale) > MAX_SCALE:
                raise InvalidRequest("lora", f"adapter '{name}': scale {scale!r} is outside [-4, 4]")
            if name in self.refused:
                raise InvalidRequest("lora", self.refused[name], code="lora_incompatible")
            if name not in offered:
                known = ", ".join(offered) or "none"
                raise InvalidRequest("lora", f"no LoRA adapter '{name}' for model '{self.model}'; available: "
                                     f"{known}", code="lora_not_found")
            scales[name] = scales.get(name, 0.0) + float(scale)
        return scales


def _zero_feeds(layers: dict[str, Slot]) -> dict[str, np.ndarray]:
    feeds = {}
    for layer, slot in layers.items():
        feeds[layer + DOWN], feeds[layer + UP] = slot.zeros(1)
    return feeds


def _concatenated(part: str, layers: dict[str, Slot], using: list[tuple[Fitted, float]]) -> dict[str, np.ndarray]:
    """Each layer's adapters side by side along the rank axis (zeros where an adapter leaves it alone)."""
    part_feeds = {}
    for layer, slot in layers.items():
        downs, ups = [], []
        for fitted, scale in using:
            down, up = fitted.feeds[part].get(layer) or slot.zeros(fitted.ranks[part])
            downs.append(down)
            ups.append(up * np.float32(scale))
        down_axis, up_axis = (0, 1) if slot.conv else (1, 0)
        part_feeds[layer + DOWN] = np.concatenate(downs, axis=down_axis)
        part_feeds[layer + UP] = np.concatenate(ups, axis=up_axis)
    return part_feeds
