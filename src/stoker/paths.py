"""Paths a user wrote: relative ones resolve against the current folder, as in LLaMA-Factory, and say so when missing."""

from __future__ import annotations

import os
from pathlib import Path


def shown(path: str | os.PathLike[str]) -> str:
    """``path`` as written, quoted; a relative one with the folder it was resolved against."""
    written = os.fspath(path)
    if Path(written).expanduser().is_absolute():
        return repr(written)
    return f"{written!r} (relative to the current folder, {Path.cwd()})"


def cache_home() -> Path:
    """Stoker's cache folder: ``$XDG_CACHE_HOME/stoker``, else ``~/.cache/stoker``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stoker"
