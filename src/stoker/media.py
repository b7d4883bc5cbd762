"""Image inputs: load and validate them, then turn them into what the model's processor and engine take.

Where an image may come from, and who may ask for it:
- a PIL image, or a dict with ``bytes`` (hub datasets): already in hand, always accepted;
- ``data:image/...;base64,...`` URLs: decoded in memory;
- ``http(s)://`` URLs: fetched with a size cap and a timeout; the host must resolve to public addresses only
  (private, loopback and link-local ones need ``allow_private_urls: true``; unspecified, multicast and reserved ones
  are always refused), and every redirect is checked the same way. The connection goes to the address that was
  checked, so a second DNS answer cannot swap in another;
- file paths: only under an allowed folder (``media_dir``; predict adds ``dataset_dir``), after resolving ``..`` and
  symlinks, unless the caller is local (``local_ok=True``: the terminal chat, whose user owns the files anyway).

Strings reaching ``prepare_images`` are untrusted (they come from API requests). Surfaces whose user is local (the
terminal chat, the web chat's upload, predict) load their images with ``load_image`` and pass the PIL images on.

Every image is checked (size in bytes, format, decodability) and then scaled into
[``image_min_pixels``, ``image_max_pixels``] keeping its aspect ratio, as LLaMA-Factory does, and converted to RGB.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import math
import os
import socket
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

from stoker.config import Settings
from stoker.errors import MediaError

IMAGE_PLACEHOLDER = "<image>"  # what users and datasets write where an image goes

FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")  # PIL format names accepted; others are refused, not guessed at
MAX_DECODE_PIXELS = 64_000_000  # a header claiming more is refused before decoding (decompression bombs)
FETCH_TIMEOUT_S = 10.0  # whole fetch, redirects included
MAX_REDIRECTS = 3

# Placeholder text (before expansion), by processor class, where it is not the processor's image token alone.
PROCESSOR_PLACEHOLDERS = {
    "Qwen2VLProcessor": "<|vision_start|><|image_pad|><|vision_end|>",
    "Qwen2_5_VLProcessor": "<|vision_start|><|image_pad|><|vision_end|>",
}

Message = dict[str, Any]


# --------------------------------------------------------------------------------------------------------------------
# Loading and validation
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
        image = _checked_pil(ref, "the image")
        try:
            image.load()
        except Exception as exc:  # noqa: BLE001 - a lazily opened file may be damaged
            raise MediaError(f"the image cannot be decoded: {exc}.", param="messages") from None
        return _finish(image, settings)
    if isinstance(ref, dict) and isinstance(ref.get("bytes"), (bytes, bytearray)):
        return decode_image(bytes(ref["bytes"]), settings, what=f"image {ref.get('path') or '(bytes)'}")
    if isinstance(ref, dict) and isinstance(ref.get("path"), str):
        ref = ref["path"]
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str) or not ref.strip():
        raise MediaError(
            f"an image must be a data: URL, an http(s) URL or a file path, not {type(ref).__name__} {_short(ref)!r}.",
            param="messages",
        )
    ref = ref.strip()
    scheme = ref.split(":", 1)[0].lower() if ":" in ref else ""
    if scheme == "data":
        data, what = decode_data_url(ref), "the data: URL image"
    elif scheme in ("http", "https"):
        data, what = fetch_url(ref, settings), f"the image at {_short(ref)}"
    elif scheme == "file":
        path = unquote_to_bytes(urlsplit(ref).path).decode("utf-8", "replace")
        data, what = _read_file(path, settings, local_ok=local_ok, roots=roots), f"image file {path!r}"
    elif len(scheme) > 1 and "/" not in scheme and "\\" not in scheme:  # a URL scheme, not a Windows drive letter
        raise MediaError(
            f"unsupported image URL scheme {scheme!r}: send a data: URL, an http(s) URL or a file path.",
            param="messages",
        )
    else:
        data, what = _read_file(ref, settings, local_ok=local_ok, roots=roots), f"image file {ref!r}"
    return decode_image(data, settings, what=what)


def decode_image(data: bytes, settings: Settings, *, what: str = "the image") -> Any:
    """Decode image bytes (size, format and integrity checked) into a scaled RGB ``PIL.Image``."""
    from PIL import Image, UnidentifiedImageError

    _check_size(len(data), settings, what)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise MediaError(_unreadable_message(data, what), param="messages") from None
    except Image.DecompressionBombError:
        raise MediaError(f"{what} has too many pixels to decode safely: scale it down.", param="messages") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise MediaError(f"{what} is corrupt ({exc}).", param="messages") from None
    image = _checked_pil(image, what)
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError ... for damaged files
        detail = "it is truncated" if "truncated" in str(exc) else f"it is corrupt ({exc})"
        raise MediaError(f"{what} cannot be decoded: {detail}.", param="messages") from None
    return _finish(image, settings)


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


def _checked_pil(image: Any, what: str) -> Any:
    width, height = image.size
    if width < 1 or height < 1:
        raise MediaError(f"{what} is empty ({width}x{height} pixels).", param="messages")
    if width * height > MAX_DECODE_PIXELS:
        raise MediaError(
            f"{what} is {width}x{height} pixels, more than the {MAX_DECODE_PIXELS:,} that are decoded: scale it down.",
            param="messages",
        )
    return image


def _finish(image: Any, settings: Settings) -> Any:
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


def _check_size(size: int, settings: Settings, what: str) -> None:
    if size > settings.image_max_bytes:
        raise MediaError(
            f"{what} is {size:,} bytes, over the image_max_bytes limit of {settings.image_max_bytes:,} bytes.",
            param="messages",
        )
    if size == 0:
        raise MediaError(f"{what} is empty (0 bytes).", param="messages")


def _formats() -> str:
    return ", ".join(FORMATS[:-1]) + " or " + FORMATS[-1]


def _short(text: Any, limit: int = 80) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------------------------
# data: URLs
def decode_data_url(url: str) -> bytes:
    """The bytes of a ``data:[<mediatype>][;base64],<data>`` URL; images must be base64 with an image/* type."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise MediaError("invalid data: URL: expected data:image/<type>;base64,<data>.", param="messages")
    params = header[len("data:") :].split(";")
    mediatype = params[0].strip().lower()
    # The bytes decide the format; the declared type only has to be plausible (browsers send octet-stream for
    # files whose extension they do not know).
    if mediatype and not mediatype.startswith("image/") and mediatype != "application/octet-stream":
        raise MediaError(f"the data: URL has media type {mediatype!r}; an image needs image/<type>.", param="messages")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise MediaError("invalid data: URL: images must be base64 encoded (data:image/<type>;base64,<data>).",
                         param="messages")
    payload = unquote_to_bytes(payload.strip()).translate(None, b" \n\r\t")
    try:
        return base64.b64decode(payload + b"=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("invalid data: URL: the base64 data does not decode.", param="messages") from None


# --------------------------------------------------------------------------------------------------------------------
# Local files
def media_roots(settings: Settings, *, dataset: bool = False) -> list[Path]:
    """Folders local image paths may come from: ``media_dir`` and, for predict (``dataset``), ``dataset_dir``."""
    roots = [settings.media_dir] if settings.media_dir else []
    if dataset and settings.dataset_dir:
        roots.append(settings.dataset_dir)
    return [Path(r).expanduser() for r in roots]


def _read_file(
    path: str, settings: Settings, *, local_ok: bool, roots: Sequence[str | os.PathLike[str]] | None
) -> bytes:
    file = resolve_local_path(path, settings, local_ok=local_ok, roots=roots)
    size = file.stat().st_size
    _check_size(size, settings, f"image file {path!r}")
    with file.open("rb") as fh:
        data = fh.read(settings.image_max_bytes + 1)  # the file may have grown since stat
    _check_size(len(data), settings, f"image file {path!r}")
    return data


def resolve_local_path(
    path: str,
    settings: Settings,
    *,
    local_ok: bool = False,
    roots: Sequence[str | os.PathLike[str]] | None = None,
) -> Path:
    """The real file ``path`` names, if it may be read; raises ``MediaError`` otherwise."""
    given = Path(path).expanduser() if local_ok else Path(path)
    if local_ok:
        if given.is_file():
            return given
        raise MediaError(f"image file {path!r} not found.", param="messages")
    allowed = [Path(r).resolve() for r in (media_roots(settings) if roots is None else roots)]
    if not allowed:
        raise MediaError(
            f"local image paths are not allowed here ({_short(path)!r}): send the image as a data: URL or an http(s) "
            "URL, or set media_dir to a folder whose images may be read.",
            param="messages",
        )
    candidates = [given] if given.is_absolute() else [root / given for root in allowed]
    for candidate in candidates:
        real = candidate.resolve()  # follows symlinks and removes '..'
        if not any(real.is_relative_to(root) for root in allowed):
            continue
        if real.is_file():
            return real
    inside = [c for c in candidates if any(c.resolve().is_relative_to(root) for root in allowed)]
    if not inside:
        raise MediaError(
            f"image file {path!r} is outside the allowed media folder ({', '.join(str(r) for r in allowed)}).",
            param="messages",
        )
    raise MediaError(
        f"image file {path!r} not found in the media folder ({', '.join(str(r) for r in allowed)}).", param="messages"
    )


# --------------------------------------------------------------------------------------------------------------------
# http(s) URLs
def check_address(ip: str, settings: Settings) -> None:
    """Refuse addresses a server should not fetch from on a client's behalf (SSRF)."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    local = address.is_loopback or address.is_link_local
    if address.is_unspecified or address.is_multicast or (address.is_reserved and not local):
        raise MediaError(f"the image URL points to {ip}, which is not a public address.", param="messages")
    if (local or not address.is_global) and not settings.allow_private_urls:
        raise MediaError(
            f"the image URL points to {ip}, a private or loopback address; set allow_private_urls: true to allow it.",
            param="messages",
        )


def _resolve(host: str, port: int, settings: Settings) -> str:
    """One checked address for ``host``; every address it resolves to must pass, so none can be chosen later."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise MediaError(f"cannot resolve the image URL host {host!r}.", param="messages") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for ip in addresses:
        check_address(ip, settings)
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an already checked address, whatever the host name resolves to now."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # certificate checked for the host


def fetch_url(url: str, settings: Settings, *, timeout: float = FETCH_TIMEOUT_S) -> bytes:
    """GET an image over http(s): public hosts only (see ``check_address``), bounded size, time and redirects."""
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise MediaError(f"the image URL redirects to an unsupported scheme {scheme!r}.", param="messages")
        host = parts.hostname
        if not host:
            raise MediaError(f"the image URL {_short(url)!r} has no host.", param="messages")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise MediaError(f"the image URL {_short(url)!r} has an invalid port.", param="messages") from None
        ip = _resolve(host, port, settings)
        cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        conn = cls(host, port, ip, timeout=max(0.1, deadline - time.monotonic()))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("GET", target, headers={"User-Agent": "stoker", "Accept": "image/*"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise MediaError(f"fetching the image URL failed: HTTP {response.status}.", param="messages")
            length = response.getheader("Content-Length")
            if length and length.isdigit():
                _check_size(int(length), settings, f"the image at {_short(url)}")
            return _read_bounded(response, settings, deadline, url)
        except (TimeoutError, socket.timeout):
            raise MediaError(f"fetching the image URL timed out after {timeout:g} s.", param="messages") from None
        except (OSError, http.client.HTTPException) as exc:
            raise MediaError(f"fetching the image URL failed: {exc}.", param="messages") from None
        finally:
            conn.close()
    raise MediaError(f"the image URL redirects more than {MAX_REDIRECTS} times.", param="messages")


def _read_bounded(response: Any, settings: Settings, deadline: float, url: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError
        chunk = response.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > settings.image_max_bytes:
            raise MediaError(
                f"the image at {_short(url)} is over the image_max_bytes limit of {settings.image_max_bytes:,} bytes.",
                param="messages",
            )
        chunks.append(chunk)


# --------------------------------------------------------------------------------------------------------------------
# Placeholders and processor inputs
def place_placeholders(messages: list[Message], count: int) -> list[Message]:
    """Check the ``<image>`` placeholders match ``count`` images; with none, put them all at the start of the first
    user message (LLaMA-Factory's rule). Returns new message dicts."""
    found = sum(str(m.get("content") or "").count(IMAGE_PLACEHOLDER) for m in messages)
    if found == count:
        return [dict(m) for m in messages]
    if found:
        raise MediaError(
            f"the messages hold {found} {IMAGE_PLACEHOLDER} placeholder{'s' if found != 1 else ''} but "
            f"{count} image{'s were' if count != 1 else ' was'} given: put one {IMAGE_PLACEHOLDER} where each image "
            "goes, or none to put all images at the start of the first user message.",
            param="messages",
        )
    out = [dict(m) for m in messages]
    first = next(i for i, m in enumerate(out) if m["role"] == "user")
    out[first]["content"] = IMAGE_PLACEHOLDER * count + str(out[first].get("content") or "")
    return out


def model_placeholder(processor: Any, template: Any = None) -> str:
    """The text that stands for one image in this model's prompts, before expansion to its image tokens: the chat
    template family's (``Template.image_token``), else the processor's."""
    if getattr(template, "image_token", None):
        return template.image_token
    return PROCESSOR_PLACEHOLDERS.get(type(processor).__name__, processor.image_token)


def prepare_images(messages: list[Message], images: list[Any], service: Any) -> tuple[list[Message], dict[str, Any]]:
    """Load ``images``, put each one's image tokens where its placeholder is, and build the engine's media.

    The returned media dict:
    - ``images``: the loaded RGB PIL images (vLLM: ``multi_modal_data={"image": images}``);
    - ``inputs``: the processor's tensors (``pixel_values``, and e.g. ``image_grid_thw``) for the model's forward
      pass at prefill; engines concatenate them along dim 0 across the rows of a batch (see ``prefill_inputs``);
    - ``image_token_id`` / ``image_tokens``: the prompt must hold exactly that many of that token.

    For the vLLM backend the placeholders are not expanded (vLLM's own processor does it) and ``inputs`` is empty.
    """
    settings = service.settings
    loaded = [load_image(ref, settings) for ref in images]
    messages = place_placeholders(messages, len(loaded))
    processor = service.processor
    if processor is None or not getattr(processor, "image_token", None):
        raise MediaError(f"the model {service.model_name!r} has no image processor, so it takes no images.",
                         param="messages")
    placeholder = model_placeholder(processor, service.template)
    token = processor.image_token
    token_id = int(processor.image_token_id if getattr(processor, "image_token_id", None) is not None
                   else service.tokenizer.convert_tokens_to_ids(token))
    if settings.backend == "vllm":
        replacements = [placeholder] * len(loaded)
        inputs: dict[str, Any] = {}
        count = sum(placeholder.count(token) for _ in loaded)
    else:
        try:
            inputs = dict(processor.image_processor(loaded, return_tensors="pt"))
        except (ValueError, TypeError) as exc:  # e.g. an image below the processor's own minimum size
            raise MediaError(f"the model's image processor cannot take this image: {exc}", param="messages") from None
        try:
            expanded = [processor.replace_image_token(inputs, i) for i in range(len(loaded))]
        except NotImplementedError:
            raise MediaError(
                f"Stoker cannot tell how many image tokens {type(processor).__name__} needs per image, so this model "
                "takes no images here.",
                param="messages",
            ) from None
        replacements = [placeholder.replace(token, e) for e in expanded]
        count = sum(r.count(token) for r in replacements)
    pending = iter(replacements)
    out = []
    for message in messages:
        text = str(message.get("content") or "")
        if IMAGE_PLACEHOLDER in text:
            pieces = text.split(IMAGE_PLACEHOLDER)
            text = pieces[0] + "".join(next(pending) + piece for piece in pieces[1:])
        out.append({**message, "content": text})
    media = {"images": loaded, "inputs": inputs, "image_token_id": token_id, "image_tokens": count}
    return out, media


def check_prompt_images(prompt_ids: Sequence[int], media: dict[str, Any] | None, image_token_id: int | None,
                        *, where: str = "the request") -> None:
    """The prompt holds exactly the image tokens its media fill; a mismatch would fail the whole batch's forward."""
    from stoker.errors import RequestError

    if image_token_id is None:
        return
    found = sum(1 for t in prompt_ids if t == image_token_id)
    wanted = int(media["image_tokens"]) if media else 0
    if found == wanted:
        return
    if not media:
        raise RequestError(
            f"{where} holds {found} image token{'s' if found != 1 else ''} but no image: send images as image_url "
            f"content parts rather than writing {IMAGE_PLACEHOLDER} (or the model's image token) in the text.",
            param="messages",
        )
    raise RequestError(
        f"{where} holds {found} image tokens where its images need {wanted}: the prompt was cut or the chat template "
        "dropped a placeholder; shorten the conversation or check the template.",
        param="messages",
    )


def prefill_inputs(
    model: Any, medias: Sequence[dict[str, Any] | None], input_ids: Any, attention_mask: Any, position_ids: Any
) -> tuple[dict[str, Any], Any, Any]:
    """Forward kwargs for a left-padded prefill batch whose rows carry ``medias`` (None: a text row).

    Returns ``(extra kwargs, position_ids to use, per-row position offsets or None)``. Tensors of the rows' media
    are concatenated along dim 0 in row order, which is the order the model fills its image tokens in. Models with
    multimodal RoPE (Qwen2-VL) get 3D position ids; their offsets shift the text positions of every later decode step.
    """
    import torch

    inputs: dict[str, list[Any]] = {}
    for media in medias:
        for key, value in ((media or {}).get("inputs") or {}).items():
            inputs.setdefault(key, []).append(value)
    device = input_ids.device
    dtype = next(model.parameters()).dtype
    extra = {}
    for key, values in inputs.items():
        value = torch.cat([torch.as_tensor(v) for v in values], dim=0).to(device)
        extra[key] = value.to(dtype) if value.is_floating_point() else value
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(core, "model", None)
    if "image_grid_thw" in extra and hasattr(inner, "get_rope_index"):
        image_id = core.config.image_token_id
        kinds = (input_ids == image_id).to(torch.int)
        positions, deltas = inner.get_rope_index(
            input_ids, mm_token_type_ids=kinds, image_grid_thw=extra["image_grid_thw"], attention_mask=attention_mask
        )
        return extra, positions, deltas.reshape(-1).to(device)
    return extra, position_ids, None
