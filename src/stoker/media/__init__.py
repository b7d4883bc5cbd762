"""Media inputs, loaded safely: where an image may come from, and the checks every image passes.

- ``load``: ``load_image`` takes any reference (PIL image, bytes, data: URL, http(s) URL, path) to a checked RGB image;
- ``images``: decoding, size and format checks, scaling into LLaMA-Factory's pixel bounds;
- ``files``: the local-path sandbox (``media_dir``, ``dataset_dir`` for predict);
- ``urls``: fetching over http(s) without reaching private addresses.

What the images become in a prompt (placeholders, image tokens) is the chat package's job (``chat.media``); what the
model's forward pass takes is the engine's (``engines.hf_media``).
"""

from __future__ import annotations

from stoker.media.files import media_roots, resolve_local_path
from stoker.media.images import decode_image, fit_pixels
from stoker.media.load import decode_data_url, load_image
from stoker.media.urls import check_address, fetch_url

IMAGE_PLACEHOLDER = "<image>"  # what users and datasets write where an image goes

__all__ = [
    "IMAGE_PLACEHOLDER",
    "check_address",
    "decode_data_url",
    "decode_image",
    "fetch_url",
    "fit_pixels",
    "load_image",
    "media_roots",
    "resolve_local_path",
]
