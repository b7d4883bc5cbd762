"""``load_image``: any image reference a surface or a dataset can hand over, to a validated RGB ``PIL.Image``.

Where an image may come from, and who may ask for it:
- a PIL image, or a dict with ``bytes`` (hub datasets): already in hand, always accepted;
- ``data:image/...;base64,...`` URLs: decoded in memory;
- ``http(s)://`` URLs: fetched with the guards of ``media.urls``;
- file paths: only under an allowed folder (``media.files``), unless the caller is local.

Strings from API requests are untrusted; surfaces whose user is local (the terminal chat, the web chat's upload,
predict) load their images themselves and pass the PIL images on.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from stoker.config import Settings
from stoker.errors import MediaError
from stoker.media.files import read_file
from stoker.media.images import checked_pil, decode_image, finish_image, short
from stoker.media.urls import fetch_url


def load_image(
    ref: Any,
    settings: Settings,
    *,
    local_ok: bool = False,
    roots: Sequence[str | os.PathLike[str]] | None = None,
) -> Any:
    """A validated RGB ``PIL.Image`` for ``ref`` (PIL image, ``{"bytes": ...}``, data: URL, http(s) URL or path).

    ``local_ok``: any file path is allowed (the user is local). Otherwise paths must lie under ``roots`` (default:
    ``media_roots(settings)``); a relative path is looked up in each root in turn. Raises ``MediaError``.
    """
    from PIL import Image

    if isinstance(ref, Image.Image):
        image = checked_pil(ref, "the image")
        try:
            image.load()
        except Exception as exc:  # noqa: BLE001 - a lazily opened file may be damaged
            raise MediaError(f"the image cannot be decoded: {exc}.", param="messages") from None
        return finish_image(image, settings)
    if isinstance(ref, dict) and isinstance(ref.get("bytes"), (bytes, bytearray)):
        return decode_image(bytes(ref["bytes"]), settings, what=f"image {ref.get('path') or '(bytes)'}")
    data, what = media_bytes(ref, settings, "image", local_ok=local_ok, roots=roots)
    return decode_image(data, settings, what=what)


def media_bytes(
    ref: Any,
    settings: Settings,
    kind: str,
    *,
    local_ok: bool = False,
    roots: Sequence[str | os.PathLike[str]] | None = None,
) -> tuple[bytes, str]:
    """The bytes an image or video (``kind``) reference names, under the same rules; and its name for messages."""
    if isinstance(ref, dict) and isinstance(ref.get("path"), str):
        ref = ref["path"]
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str) or not ref.strip():
        raise MediaError(
            f"{article(kind)} must be a data: URL, an http(s) URL or a file path, not {type(ref).__name__} "
            f"{short(ref)!r}.",
            param="messages",
        )
    ref = ref.strip()
    scheme = ref.split(":", 1)[0].lower() if ":" in ref else ""
    if scheme == "data":
        data, what = decode_data_url(ref, kind), f"the data: URL {kind}"
    elif scheme in ("http", "https"):
        data, what = fetch_url(ref, settings, kind=kind), f"the {kind} at {short(ref)}"
    elif scheme == "file":
        path = unquote_to_bytes(urlsplit(ref).path).decode("utf-8", "replace")
        data, what = read_file(path, settings, local_ok=local_ok, roots=roots, kind=kind), f"{kind} file {path!r}"
    elif len(scheme) > 1 and "/" not in scheme and "\\" not in scheme:  # a URL scheme, not a Windows drive letter
        raise MediaError(
            f"unsupported {kind} URL scheme {scheme!r}: send a data: URL, an http(s) URL or a file path.",
            param="messages",
        )
    else:
        data, what = read_file(ref, settings, local_ok=local_ok, roots=roots, kind=kind), f"{kind} file {ref!r}"
    return data, what


def article(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def decode_data_url(url: str, kind: str = "image") -> bytes:
    """The bytes of a ``data:[<mediatype>][;base64],<data>`` URL; images (videos) must be base64 with an image/*
    (video/*) type."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise MediaError(f"invalid data: URL: expected data:{kind}/<type>;base64,<data>.", param="messages")
    params = header[len("data:") :].split(";")
    mediatype = params[0].strip().lower()
    # The bytes decide the format; the declared type only has to be plausible (browsers send octet-stream for
    # files whose extension they do not know).
    if mediatype and not mediatype.startswith(f"{kind}/") and mediatype != "application/octet-stream":
        raise MediaError(f"the data: URL has media type {mediatype!r}; {article(kind)} needs {kind}/<type>.",
                         param="messages")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise MediaError(f"invalid data: URL: {kind}s must be base64 encoded (data:{kind}/<type>;base64,<data>).",
                         param="messages")
    payload = unquote_to_bytes(payload.strip()).translate(None, b" \n\r\t")
    try:
        return base64.b64decode(payload + b"=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("invalid data: URL: the base64 data does not decode.", param="messages") from None
