"""Vision-language models: detection from the config, and loading through the model's processor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stoker.config import Settings
from stoker.errors import ModelLoadError


def is_vision_config(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None


def load_vision_model(path: Path, settings: Settings, *, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=settings.trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            str(path), dtype=dtype, trust_remote_code=settings.trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the vision model from {path}: {type(exc).__name__}: {exc}") from None
    return model, processor
