"""LoRA adapters at the HTTP edge: a request's `lora` field and `<lora:name:weight>` prompt tags into one
list, checked against the limits; which nodes offer an order's adapters, and the error when none does.

Both forms add up: `lora: [{"name": "a", "scale": 0.5}]` with the prompt "a cat <lora:b:0.8>" renders
with a at 0.5 and b at 0.8, and the encoders see "a cat". On multipart routes the field is JSON text.
"""

from __future__ import annotations

import math
import re

import msgspec

from engines.info import ModelInfo
from server.errors import ApiError
from server.protocol import AdapterCard, LoraRef

MAX_ADAPTERS = 8
MAX_SCALE = 4.0
_TAG = re.compile(r"<lora:([^:<>]*)(?::([^<>]*))?>", re.IGNORECASE)


def resolve(field: list[LoraRef] | str | None, prompt: str) -> tuple[str, list[LoraRef]]:
    """The prompt without its LoRA tags, and the request's adapters (the field's, then the tags')."""
    chosen = list(_field(field))
    for match in _TAG.finditer(prompt):
        name, weight = match.group(1).strip(), (match.group(2) or "1").strip()
        try:
            scale = float(weight)
        except ValueError:
            raise ApiError(400, f"prompt tag {match.group(0)!r}: the weight must be a number", param="lora",
                           code="invalid_lora") from None
        chosen.append(LoraRef(name=name, scale=scale))
    for ref in chosen:
        if not ref.name:
            raise ApiError(400, "a LoRA adapter needs a name", param="lora", code="invalid_lora")
        if not math.isfinite(ref.scale) or abs(ref.scale) > MAX_SCALE:
            raise ApiError(400, f"adapter '{ref.name}': scale {ref.scale:g} is outside [-4, 4]", param="lora",
                           code="invalid_lora")
    if len(chosen) > MAX_ADAPTERS:
        raise ApiError(400, f"{len(chosen)} LoRA adapters (field and prompt tags together); at most "
                       f"{MAX_ADAPTERS} per request", param="lora", code="invalid_lora")
    text = " ".join(_TAG.sub(" ", prompt).split()) if chosen else prompt
    return text, chosen


def _field(field: list[LoraRef] | str | None) -> list[LoraRef]:
    if not isinstance(field, str):
        return field or []
    try:  # multipart forms carry the list as JSON text
        return msgspec.json.decode(field, type=list[LoraRef]) if field.strip() else []
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ApiError(400, f"'lora' must be a JSON list of {{\"name\", \"scale\"}} objects: {exc}", param="lora",
                       code="invalid_lora") from exc


def offers(info: ModelInfo, names: set[str]) -> bool:
    return names <= {a.name for a in info.adapters}


def unavailable(model: str, names: set[str], infos: list[ModelInfo]) -> ApiError:
    """The 400 for adapters no node offers together for `model`: why one does not fit, or that it is unknown."""
    offered = {a.name for info in infos for a in info.adapters}
    for name in sorted(names - offered):
        reason = next((i.refused_adapters[name] for i in infos if name in i.refused_adapters), None)
        if reason:
            return ApiError(400, reason, param="lora", code="lora_incompatible")
        if not any(i.lora_rank for i in infos):
            return ApiError(400, f"model '{model}' was exported without LoRA support; export it with "
                            "`python -m export … --lora-rank R` to use adapters", param="lora", code="invalid_lora")
        return ApiError(400, f"no LoRA adapter '{name}' for model '{model}'; available: "
                        f"{', '.join(sorted(offered)) or 'none'}", param="lora", code="lora_not_found")
    return ApiError(400, f"no node offers the adapters {', '.join(sorted(names))} together for model '{model}'",
                    param="lora", code="lora_not_found")


def merged(first: ModelInfo, other: ModelInfo) -> ModelInfo:
    """A model as the fleet offers it: one node's card with the adapters of every node."""
    known = {a.name for a in first.adapters}
    extra = [a for a in other.adapters if a.name not in known]
    return msgspec.structs.replace(first, adapters=[*first.adapters, *extra]) if extra else first


def cards(info: ModelInfo) -> list[AdapterCard]:
    return [AdapterCard(name=a.name, rank=a.rank, parts=a.parts) for a in info.adapters]
