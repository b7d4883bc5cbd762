"""``stoker demo``: build the demo models if needed and print where they are."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from stoker.demo.cache import ENV_DIR, ensure
from stoker.demo.evaluate import DemoBuildError
from stoker.demo.registry import DEMO_MODELS
from stoker.errors import StokerError


def main(argv: Sequence[str] | None = None) -> int:
    """Print one ``name: path`` line per demo model on stdout; progress goes to stderr."""
    parser = argparse.ArgumentParser(
        prog="stoker demo",
        description="Build Stoker's tiny demo models (once, a few minutes on CPU) and print their folders.",
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"models to build (default: all of {', '.join(DEMO_MODELS)})"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help=f"cache folder (default: ${ENV_DIR} or ~/.cache/stoker/demo)"
    )
    args = parser.parse_args(argv)
    _log_to_stderr()
    try:
        folders = ensure(args.names or None, root=args.dir)
    except StokerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except DemoBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, folder in folders.items():
        print(f"{name}: {folder}")
    return 0


def _log_to_stderr() -> None:
    """Show build progress unless the caller (e.g. the stoker CLI) has already set up logging."""
    logger = logging.getLogger("stoker")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
