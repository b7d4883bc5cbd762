"""Image bytes to a validated, scaled RGB image: size, format and integrity checks, then LLaMA-Factory's pixel bounds.

Every image is checked (size in bytes, format, decodability) and then scaled into
[``image_min_pixels``, ``image_max_pixels``] keeping its aspect ratio, as LLaMA-Factory does, and converted to RGB.
"""

from __future__ import annotations

import io
import math
from typing import Any

from stoker.config import Settings
from stoker.errors import MediaError

FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")  # PIL format names accepted; others are refused, not guessed at
MAX_DECODE_PIXELS = 64_000_000  # a header claiming more is refused before decoding (decompression bombs)


def decode_image(data: bytes, settings: Settings, *, what: str = "the image") -> Any:
    """Decode image bytes (size, format and integrity checked) into a scaled RGB ``PIL.Image``."""
    from PIL import Image, UnidentifiedImageError

    check_size(len(data), settings, what)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise MediaError(_unreadable_message(data, what), param="messages") from None
    except Image.DecompressionBombError:
        raise MediaError(f"{what} has too many pixels to decode safely: scale it down.", param="messages") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise MediaError(f"{what} is corrupt ({exc}).", param="messages") from None
    image = checked_pil(image, what)
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError ... for damaged files
        detail = "it is truncated" if "truncated" in str(exc) else f"it is corrupt ({exc})"
        raise MediaError(f"{what} cannot be decoded: {detail}.", param="messages") from None
    return finish_image(image, settings)


def _unreadable_message(data: bytes, what: str) -> str:
    """Name the format when PIL knows it but we do not accept it; otherwise say it is not an image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as other:  # header only: nothing is decoded
            found = other.format
    except Exception:  # noqa: BLE001
        found = None
    if found:
        return f"{what} is in {found} format, which is not supported: send {_formats()}."
    return f"{what} is not an image in a supported format ({_formats()})."


def checked_pil(image: Any, what: str) -> Any:
    width, height = image.size
    if width < 1 or height < 1:
        raise MediaError(f"{what} is empty ({width}x{height} pixels).", param="messages")
    if width * height > MAX_DECODE_PIXELS:
        raise MediaError(
            f"{what} is {width}x{height} pixels, more than the {MAX_DECODE_PIXELS:,} that are decoded: scale it down.",
            param="messages",
        )
    return image


def finish_image(image: Any, settings: Settings) -> Any:
    """First frame, RGB (transparency over white), scaled into [image_min_pixels, image_max_pixels]."""
    from PIL import Image

    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    if image.mode != "RGB":
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:  # some transparency: flatten onto white, not onto black
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            image = flat
        else:
            image = rgba.convert("RGB")
    return fit_pixels(image, settings.image_min_pixels, settings.image_max_pixels)


def fit_pixels(image: Any, min_pixels: int, max_pixels: int) -> Any:
    """Scale ``image`` (aspect ratio kept) so that width x height lies in [min_pixels, max_pixels]."""
    from PIL import Image

    width, height = image.size
    area = width * height
    if area > max_pixels:
        scale = math.sqrt(max_pixels / area)
        size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
    elif area < min_pixels:
        scale = math.sqrt(min_pixels / area)
        size = (math.ceil(width * scale), math.ceil(height * scale))
    else:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)


def check_size(size: int, settings: Settings, what: str, kind: str = "image") -> None:
    limit = getattr(settings, f"{kind}_max_bytes")
    if size > limit:
        raise MediaError(
            f"{what} is {size:,} bytes, over the {kind}_max_bytes limit of {limit:,} bytes.",
            param="messages",
        )
    if size == 0:
        raise MediaError(f"{what} is empty (0 bytes).", param="messages")


def _formats() -> str:
    return ", ".join(FORMATS[:-1]) + " or " + FORMATS[-1]


def short(text: Any, limit: int = 80) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
