"""GGUF files as a model path: which file a config means, and what its header says, without loading it.

A config names a GGUF file as ``model_name_or_path: path/to/model.gguf``, as a folder holding one ``.gguf`` (and no
``config.json``), or with ``gguf_file:`` beside a folder or hub id. transformers then loads the tokenizer, the chat
template and the dequantized weights from it (``from_pretrained(folder, gguf_file=name)``).

The header is read here directly (the key-value section only, a few milliseconds) rather than through the ``gguf``
package's reader, which also indexes every tensor (seconds), so that checks before loading stay fast.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from stoker.errors import ConfigError, ModelLoadError

SUFFIX = ".gguf"
# GGUF value types (ggml's gguf.h): their struct formats; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def gguf_file(written: str | None, folder: Path, given: str | None = None) -> str | None:
    """The GGUF file (a name inside ``folder``) the config means, or None for an ordinary model folder."""
    if given:
        if not (folder / given).is_file():
            raise ConfigError(f"invalid value for gguf_file: {given!r} is not a file in {folder}.", param="gguf_file")
        return given
    if written and written.endswith(SUFFIX):
        return Path(written).name
    if (folder / "config.json").is_file():
        return None
    found = sorted(p.name for p in folder.glob(f"*{SUFFIX}"))
    if len(found) > 1:
        raise ConfigError(f"the folder {folder} holds {len(found)} GGUF files ({', '.join(found)}) and no "
                          "config.json: name one with gguf_file: NAME, or point model_name_or_path at the file.",
                          param="gguf_file")
    return found[0] if found else None


def read_metadata(path: Path) -> dict[str, Any]:
    """The key-value metadata of a GGUF file (arrays longer than 64 entries are kept as their length only)."""
    try:
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelLoadError(f"{path} is not a GGUF file (its first bytes are not 'GGUF').")
            version = _read(fh, "<I")
            if version < 2:
                raise ModelLoadError(f"{path} is GGUF version {version}; only version 2 and later are read.")
            _read(fh, "<Q")  # tensor count
            count = _read(fh, "<Q")
            return {_string(fh): _value(fh, _read(fh, "<I")) for _ in range(count)}
    except (OSError, struct.error, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read the GGUF header of {path}: {exc}") from None


def _read(fh: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = fh.read(size)
    if len(data) != size:
        raise struct.error("unexpected end of file")
    return struct.unpack(fmt, data)[0]


def _string(fh: BinaryIO) -> str:
    return fh.read(_read(fh, "<Q")).decode("utf-8")


def _value(fh: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        return _read(fh, _SCALARS[kind])
    if kind == _STRING:
        return _string(fh)
    if kind == _ARRAY:
        item, length = _read(fh, "<I"), _read(fh, "<Q")
        if item in _SCALARS and length > 64:  # skip big numeric arrays (token scores, types) in one seek
            fh.seek(struct.calcsize(_SCALARS[item]) * length, 1)
            return length
        values = [_value(fh, item) for _ in range(length)]
        return values if length <= 64 else length
    raise struct.error(f"unknown GGUF value type {kind}")


def architecture(metadata: dict[str, Any]) -> str:
    return str(metadata.get("general.architecture") or "unknown")
