"""A1111's infotext: the generation parameters as one text, written into each image A1111 returns (a PNG
`parameters` text chunk) and read back by `/sdapi/v1/png-info`.

    a lighthouse at dusk
    Negative prompt: fog
    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 5, Size: 512x512, Model: sd15

The prompt lines, the negative prompt's, then `Key: value` pairs (a value holding `,`, `:` or a newline is
JSON-quoted). Reading gives A1111's `parse_generation_parameters` keys: "Prompt", "Negative prompt", each
pair, and a size split into "Size-1" and "Size-2". Only PNGs carry it here: JPEG and WebP answers go without
(A1111 puts it in their EXIF).
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from typing import Any

from PIL import Image

from server.wire import RenderOrder

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A1111's re_param, with its key bounded (A1111's keys are short): an unbounded key tried at every position of a
# long line without a colon took time growing with the line's square (a 20 kB line, 5 s of the event loop).
_PAIR = re.compile(r'\s*(\w[\w \-/]{0,63}):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def write(order: RenderOrder, seed: int, sampler: str, schedule: str) -> str:
    """The infotext of image `seed` of `order` (A1111's sampler name and schedule label)."""
    lines = [order.prompt]
    if order.negative_prompt:
        lines.append(f"Negative prompt: {order.negative_prompt}")
    pairs = {"Steps": order.steps, "Sampler": sampler, "Schedule type": schedule,
             "CFG scale": f"{order.guidance_scale:g}", "Seed": seed, "Size": f"{order.width}x{order.height}",
             "Model": order.model}
    if order.image is not None:
        pairs["Denoising strength"] = f"{order.strength:g}"
    if order.lora:
        pairs["Lora"] = ", ".join(f"{ref.name}: {ref.scale:g}" for ref in order.lora)
    return "\n".join([*lines, ", ".join(f"{key}: {_quote(str(value))}" for key, value in pairs.items())])


def parse(text: str) -> dict[str, Any]:
    """An infotext → A1111's parameters: the prompts, each `Key: value`, the size as "Size-1"/"Size-2"."""
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:  # no parameters line: all of it is prompt
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in (line.strip() for line in lines):
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line.removeprefix("Negative prompt:").strip()
        (negative if in_negative else prompt).append(line)
    found: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(last):
        value = _unquote(value)
        size = _SIZE.match(value)
        if size:
            found[f"{key}-1"], found[f"{key}-2"] = size.group(1), size.group(2)
        else:
            found[key] = value
    return found


def embed(png: bytes, text: str) -> bytes:
    """`png` with `text` as its `parameters` text chunk (after the header, as Pillow writes text), the pixels
    untouched: tEXt where the text is Latin-1, else iTXt (UTF-8)."""
    if not png.startswith(PNG_SIGNATURE):
        return png
    try:
        kind, data = b"tEXt", b"parameters\0" + text.encode("latin-1")
    except UnicodeEncodeError:
        kind, data = b"iTXt", b"parameters\0\0\0\0\0" + text.encode("utf-8")
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header_end = len(PNG_SIGNATURE) + 8 + struct.unpack(">I", png[8:12])[0] + 4  # the IHDR chunk
    return png[:header_end] + chunk + png[header_end:]


def read(image: Image.Image) -> tuple[str, dict[str, Any]]:
    """An image's infotext ("" if none) and its other text fields, as A1111's `read_info_from_image`."""
    info = dict(image.info)
    text = info.pop("parameters", "")
    items = {key: value for key, value in info.items() if isinstance(value, str | int | float)}
    return text if isinstance(text, str) else "", items


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


def _unquote(value: str) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        return str(json.loads(value))
    except json.JSONDecodeError:
        return value
