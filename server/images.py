"""Images at the HTTP edge: decoding and checking uploads, turning OpenAI alpha masks into the engines'
masks, and encoding rendered images in the requested output format.

An upload's format is decided by decoding its bytes, never by its file name or content type.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import ApiError

# MPO is how many phone cameras write JPEG (a JPEG with more frames after it): its first frame is the photo.
FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp"}
ACCEPTED = "PNG, JPEG or WebP"
_OBJECT = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")  # how PIL names the file object it read: no use to a client
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def decode(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Bytes → a fully decoded, upright 8-bit image, or a 400 naming `param`. Checks the pixel count from
    the header before decoding, so a decompression bomb costs nothing."""
    if not data:
        raise ApiError(400, f"'{param}' is empty", param=param, code="invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            kind = image.format
            if kind not in FORMATS:
                raise ApiError(400, f"'{param}' must be a {ACCEPTED} image (got {kind or 'unknown'})",
                               param=param, code="invalid_image_format")
            width, height = image.size
            if width * height > max_pixels:
                raise ApiError(400, f"'{param}' is {width}x{height}: over the limit of {max_pixels} pixels",
                               param=param, code="image_too_large")
            image.load()
            # Inside the try: a malformed EXIF block is a bad upload, not our fault.
            return _eight_bit(ImageOps.exif_transpose(image))
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ApiError(400, f"'{param}' is too large to decode: {exc}", param=param, code="image_too_large") from exc
    except UnidentifiedImageError as exc:
        raise ApiError(400, f"'{param}' is not an image in an accepted format ({ACCEPTED})", param=param,
                       code="invalid_image_format") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError… for broken files
        reason = _OBJECT.sub("", str(exc)) or type(exc).__name__
        raise ApiError(400, f"'{param}' could not be decoded as a {ACCEPTED} image ({reason})", param=param,
                       code="invalid_image_format") from exc


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale PNGs open as integer modes, which PIL's convert("RGB") clips to white: scale them."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return image
    wide = np.asarray(image)
    return Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), mode="L")


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def edit_mask(alpha_source: Image.Image) -> Image.Image | None:
    """OpenAI semantics → engines' mask: fully transparent pixels (alpha 0) are repainted (white).
    None when nothing is transparent. Works on the 8-bit alpha band alone (a 16-megapixel mask costs 32 MB,
    not an RGBA copy and an int64 array)."""
    source = alpha_source if "A" in alpha_source.getbands() else alpha_source.convert("RGBA")
    repaint = source.getchannel("A").point(lambda alpha: 255 if alpha == 0 else 0)
    return repaint if repaint.getbbox() is not None else None


def png(image: Image.Image) -> bytes:
    """Lossless transport between the front door and a node. Uploads are fitted to the render size first
    (`engines.images.fit`, exactly what the engines do to their inputs), so that an order carries the pixels
    it renders from (a node's own fit is then a no-op) instead of a 16-megapixel upload re-encoded as PNG,
    which could outgrow a node's body limit."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encode(image: Image.Image, output_format: str, compression: int | None) -> bytes:
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    elif output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=90 if compression is None else compression)
    else:
        image.save(buffer, format="WEBP", quality=90 if compression is None else compression)
    return buffer.getvalue()
