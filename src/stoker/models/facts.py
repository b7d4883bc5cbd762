"""What a model folder says about itself before anything is loaded: config.json and generation_config.json.

Pure JSON, no torch or transformers: the engine factory, the vLLM arguments and the templates read it cheaply.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoker.errors import ModelLoadError

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


@dataclass(frozen=True)
class ModelFacts:
    """What the engine arguments depend on, read from the model folder's config.json."""

    context_length: int | None  # max_position_embeddings (or the like); None when the config does not say
    num_attention_heads: int | None
    eos_token_ids: list[int]  # config.json's eos_token_id, the fallback when generation_config.json has none
    vision: bool
    model_type: str | None = None
    quant_method: str | None = None  # a checkpoint quantized ahead of time: config.json's quantization_config
    rope_parameters: dict[str, Any] | None = None  # the text model's RoPE settings (rope_theta included)
    attention_chunk_size: int | None = None  # chunked local attention (Llama 4)


def read_model_facts(path: Path, gguf: str | None = None) -> ModelFacts:
    """What the folder's config.json says, or the header of ``gguf`` (a GGUF file in the folder)."""
    if gguf is not None:
        return _gguf_facts(path / gguf)
    file = path / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return ModelFacts(None, None, [], False)
    # Vision-language and other composite models keep the language model's shape in text_config.
    text = config.get("text_config") or config
    context = None
    for key in CONTEXT_KEYS:
        value = text.get(key, config.get(key))
        if isinstance(value, int) and value > 0:
            context = value
            break
    heads = text.get("num_attention_heads", config.get("num_attention_heads"))
    return ModelFacts(
        context_length=context,
        num_attention_heads=heads if isinstance(heads, int) else None,
        eos_token_ids=token_ids(text.get("eos_token_id", config.get("eos_token_id"))),
        vision=config.get("vision_config") is not None,
        model_type=config.get("model_type"),
        quant_method=(config.get("quantization_config") or {}).get("quant_method"),
        rope_parameters=_rope_parameters(text),
        attention_chunk_size=text.get("attention_chunk_size"),
    )


def _gguf_facts(file: Path) -> ModelFacts:
    from stoker.models.gguf import architecture, read_metadata

    meta = read_metadata(file)
    arch = architecture(meta)
    context = meta.get(f"{arch}.context_length")
    heads = meta.get(f"{arch}.attention.head_count")
    return ModelFacts(context_length=context if isinstance(context, int) else None,
                      num_attention_heads=heads if isinstance(heads, int) else None,
                      eos_token_ids=token_ids(meta.get("tokenizer.ggml.eos_token_id")), vision=False,
                      model_type=arch)


def _rope_parameters(text: dict[str, Any]) -> dict[str, Any] | None:
    params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    if "rope_theta" in text:
        params.setdefault("rope_theta", text["rope_theta"])
    return params or None


def read_generation_config(path: Path) -> dict[str, Any]:
    """The folder's generation_config.json as a dict ({} when there is none)."""
    file = path / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{file} is not valid JSON: {exc}") from None


def eos_token_ids(generation_config: dict[str, Any], config_eos: Sequence[int], tokenizer: Any) -> list[int]:
    """The ids that end a reply, as transformers decides them: generation_config.json's eos_token_id when the file
    names one, else config.json's; the tokenizer's eos is added on top. Every engine stops on exactly these."""
    if "eos_token_id" in generation_config:
        ids = token_ids(generation_config["eos_token_id"])
    else:
        ids = list(config_eos)
    return sorted({*ids, *token_ids(getattr(tokenizer, "eos_token_id", None))})


def folder_eos_ids(path: Path | str | None, tokenizer: Any = None) -> list[int]:
    """``eos_token_ids`` for a model folder; [] for no folder, or one whose files cannot be read."""
    if not path or not Path(path).is_dir():
        return []
    folder = Path(path)
    try:
        generation_config = read_generation_config(folder)
    except ModelLoadError:
        generation_config = {}
    return eos_token_ids(generation_config, read_model_facts(folder).eos_token_ids, tokenizer)


def token_ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int)]
    return []
