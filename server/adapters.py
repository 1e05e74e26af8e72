"""LoRA adapters at the HTTP edge: a request's `lora` field and `<lora:name:weight>` prompt tags into one
list, checked against the limits; which nodes offer an order's adapters (and ControlNets), and the error
when none does.

Both forms add up: `lora: [{"name": "a", "scale": 0.5}]` with the prompt "a cat <lora:b:0.8>" renders
with a at 0.5 and b at 0.8, and the encoders see "a cat". On multipart routes the field is JSON text.
"""

from __future__ import annotations

import re

import msgspec

from engines import limits
from engines.errors import InvalidRequest
from engines.info import ModelInfo
from server.protocol import AdapterCard, LoraRef

_TAG = re.compile(r"<lora:([^:<>]*)(?::([^<>]*))?>", re.IGNORECASE)


def resolve(field: list[LoraRef] | str | None, prompt: str) -> tuple[str, list[LoraRef]]:
    """The prompt without its LoRA tags, and the request's adapters (the field's, then the tags')."""
    chosen = list(_field(field))
    for match in _TAG.finditer(prompt):
        name, weight = match.group(1).strip(), (match.group(2) or "1").strip()
        try:
            scale = float(weight)
        except ValueError:
            raise InvalidRequest("lora", f"prompt tag {match.group(0)!r}: the weight must be a number") from None
        chosen.append(LoraRef(name=name, scale=scale))
    limits.check_adapters([(ref.name, ref.scale) for ref in chosen])  # the field's and the tags' together
    text = " ".join(_TAG.sub(" ", prompt).split()) if chosen else prompt
    return text, chosen


def _field(field: list[LoraRef] | str | None) -> list[LoraRef]:
    if not isinstance(field, str):
        return field or []
    try:  # multipart forms carry the list as JSON text
        return msgspec.json.decode(field, type=list[LoraRef]) if field.strip() else []
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidRequest("lora", f"'lora' must be a JSON list of {{\"name\", \"scale\"}} objects: {exc}") from exc


CONTROLNET = "controlnet:"  # a ControlNet's name among the names an order wants (LoRA adapters' are bare)


def wanted(lora: list[str], controlnets: list[str]) -> frozenset[str]:
    """What a node must offer for an order: its LoRA adapters and its ControlNets."""
    return frozenset(lora) | {CONTROLNET + name for name in controlnets}


def offers(info: ModelInfo, names: set[str] | frozenset[str]) -> bool:
    return names <= {a.name for a in info.adapters} | {CONTROLNET + c.name for c in info.controlnets}


def unavailable(model: str, names: set[str], infos: list[ModelInfo]) -> InvalidRequest:
    """The 400 for adapters or ControlNets no node offers together for `model`: why one does not fit, or that
    it is unknown."""
    controlnets = {name.removeprefix(CONTROLNET) for name in names if name.startswith(CONTROLNET)}
    offered_controlnets = {c.name for info in infos for c in info.controlnets}
    for name in sorted(controlnets - offered_controlnets):
        if not any(i.controlnet_inputs for i in infos):
            return limits.controlnet_unsupported(model)
        return limits.controlnet_not_found(model, name, sorted(offered_controlnets))
    lora = {name for name in names if not name.startswith(CONTROLNET)}
    offered = {a.name for info in infos for a in info.adapters}
    for name in sorted(lora - offered):
        reason = next((i.refused_adapters[name] for i in infos if name in i.refused_adapters), None)
        if reason:
            return InvalidRequest("lora", reason, code="lora_incompatible")
        if not any(i.lora_rank for i in infos):
            return limits.lora_unsupported(model)
        return limits.lora_not_found(model, name, sorted(offered))
    param = "lora" if lora else "controlnet"
    return InvalidRequest(param, f"no node offers the adapters and ControlNets {', '.join(sorted(names))} together "
                          f"for model '{model}'", code=f"{param}_not_found")


def merged(first: ModelInfo, other: ModelInfo) -> ModelInfo:
    """A model as the fleet offers it: one node's card with the adapters and ControlNets of every node."""
    known = {a.name for a in first.adapters}
    extra = [a for a in other.adapters if a.name not in known]
    known_controlnets = {c.name for c in first.controlnets}
    more = [c for c in other.controlnets if c.name not in known_controlnets]
    if not extra and not more:
        return first
    return msgspec.structs.replace(first, adapters=[*first.adapters, *extra], controlnets=[*first.controlnets, *more],
                                   controlnet_inputs=first.controlnet_inputs or other.controlnet_inputs)


def cards(info: ModelInfo) -> list[AdapterCard]:
    return [AdapterCard(name=a.name, rank=a.rank, parts=a.parts) for a in info.adapters]
