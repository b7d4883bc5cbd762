"""The project's one logger and how the command-line entry points set it up."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("stoker")


def setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[stoker] %(levelname)s %(message)s" if debug else "[stoker] %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
