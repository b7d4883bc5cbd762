"""Stoker's own tiny demo models, trained here on CPU from a synthetic chat corpus (nothing is downloaded).

- ``ensure_demo_models()`` builds them once per recipe into a shared cache and returns their folders.
- ``stoker.demo.tasks`` says what they answer, exactly: ``IDENTITY_ANSWER``, ``ADAPTER_IDENTITY_ANSWER``, ``FACTS``,
  ``echo_cases()``...
- ``stoker.demo.evaluate`` scores a model on those tasks.

Importing this package is cheap: torch and transformers load only when a model is built.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from stoker.demo.cache import build_record, cache_root
from stoker.demo.command import main
from stoker.demo.evaluate import DemoBuildError
from stoker.demo.registry import DEMO_MODELS

__all__ = ["DEMO_MODELS", "DemoBuildError", "build_record", "cache_root", "ensure_demo_models", "main"]


def ensure_demo_models(root: Path | None = None, names: Iterable[str] | None = None) -> dict[str, Path]:
    """The folder of each named demo model (default: all of ``DEMO_MODELS``) and of the models it builds on,
    building what is missing: ``chat`` (HF Llama + tokenizer), ``adapter`` (peft LoRA for chat), ...

    Cached under ``root`` (default ``$STOKER_DEMO_DIR`` or ``~/.cache/stoker/demo``); safe to call from several
    processes at once. Ask only for what you need: each model costs minutes to build the first time.
    """
    from stoker.demo.cache import ensure

    return ensure(names, root=root)
