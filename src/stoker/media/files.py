"""Local image files: only under an allowed folder (``media_dir``; predict adds ``dataset_dir``), after resolving
``..`` and symlinks, unless the caller is local (``local_ok=True``: the terminal chat, whose user owns the files)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from stoker.config import Settings
from stoker.errors import MediaError
from stoker.media.images import check_size, short


def media_roots(settings: Settings, *, dataset: bool = False) -> list[Path]:
    """Folders local image paths may come from: ``media_dir`` and, for predict (``dataset``), ``dataset_dir``."""
    roots = [settings.media_dir] if settings.media_dir else []
    if dataset and settings.dataset_dir:
        roots.append(settings.dataset_dir)
    return [Path(r).expanduser() for r in roots]


def read_file(
    path: str, settings: Settings, *, local_ok: bool, roots: Sequence[str | os.PathLike[str]] | None,
    kind: str = "image",
) -> bytes:
    """The bytes of an image (or a video: ``kind``) file that may be read, within its ``{kind}_max_bytes``."""
    file = resolve_local_path(path, settings, local_ok=local_ok, roots=roots, kind=kind)
    size = file.stat().st_size
    check_size(size, settings, f"{kind} file {path!r}", kind)
    with file.open("rb") as fh:
        data = fh.read(getattr(settings, f"{kind}_max_bytes") + 1)  # the file may have grown since stat
    check_size(len(data), settings, f"{kind} file {path!r}", kind)
    return data


def resolve_local_path(
    path: str,
    settings: Settings,
    *,
    local_ok: bool = False,
    roots: Sequence[str | os.PathLike[str]] | None = None,
    kind: str = "image",
) -> Path:
    """The real file ``path`` names, if it may be read; raises ``MediaError`` otherwise."""
    given = Path(path).expanduser() if local_ok else Path(path)
    if local_ok:
        if given.is_file():
            return given
        raise MediaError(f"{kind} file {path!r} not found.", param="messages")
    allowed = [Path(r).resolve() for r in (media_roots(settings) if roots is None else roots)]
    if not allowed:
        raise MediaError(
            f"local {kind} paths are not allowed here ({short(path)!r}): send the {kind} as a data: URL or an http(s) "
            f"URL, or set media_dir to a folder whose {kind}s may be read.",
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
            f"{kind} file {path!r} is outside the allowed media folder ({', '.join(str(r) for r in allowed)}).",
            param="messages",
        )
    raise MediaError(
        f"{kind} file {path!r} not found in the media folder ({', '.join(str(r) for r in allowed)}).", param="messages"
    )
