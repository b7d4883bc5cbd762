"""Tiny random-weight Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints, saved the way the hub ships them (config,
safetensors, tokenizer with the vision tokens, processor config), for tests on both backends.

Shapes are the real architectures' at toy sizes: text head_dim 64 (what vLLM's CPU attention accepts), multimodal
RoPE sections summing to 32, the towers' real patch sizes (14 for Qwen2/2.5-VL, 16 for Qwen3-VL) and 2x2 merging.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SPECIALS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
TEXT = "What shape is this? Describe the image. What is she doing? hello world assistant system user"
PIXELS = {"min_pixels": 32 * 32, "max_pixels": 256 * 256}


def _tokenizer() -> Any:
    from tokenizers import AddedToken

    from stoker.demo.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([[{"role": "user", "content": TEXT}]], 300, max_length=4096)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS], special_tokens=True)
    return tokenizer


def _config(kind: str, tokenizer: Any) -> Any:
    import transformers

    from stoker.demo.tokenizer import IM_END

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    text = {"vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "eos_token_id": eos, "pad_token_id": 0, "bos_token_id": None, "tie_word_embeddings": False}
    tokens = {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
              "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}
    if kind == "qwen2_vl":
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [8, 12, 12]}
        vision = {"depth": 1, "embed_dim": 32, "hidden_size": 128, "num_heads": 2, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2}
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
    if kind == "qwen2_5_vl":
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [8, 12, 12]}
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 128,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                  "fullatt_block_indexes": [1], "tokens_per_second": 2}
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    text.update(head_dim=64, rope_scaling={"rope_type": "default", "mrope_section": [8, 12, 12],
                                           "mrope_interleaved": True})
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 128,
              "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 256,
              "deepstack_visual_indexes": [0]}
    return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)


def _image_processor(kind: str) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if kind == "qwen3_vl":  # Qwen3-VL: 16-pixel patches, mean and std 0.5
        return Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                        image_std=[0.5] * 3, size={"shortest_edge": PIXELS["min_pixels"],
                                                                   "longest_edge": PIXELS["max_pixels"]})
    return Qwen2VLImageProcessorPil(size={"shortest_edge": PIXELS["min_pixels"], "longest_edge": PIXELS["max_pixels"]})


def build(kind: str, out: Path) -> Path:
    """Save a tiny random ``kind`` model into ``out`` (seeded: the same weights every time)."""
    import torch
    import transformers

    from stoker.demo.tokenizer import save_tokenizer

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = _config(kind, tokenizer)
    config.architectures = [type(transformers.AutoModelForImageTextToText.from_config(config)).__name__]
    model = transformers.AutoModelForImageTextToText.from_config(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    image_processor = _image_processor(kind)
    image_processor.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    processor_class = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                       "qwen3_vl": "Qwen3VLProcessor"}[kind]
    (out / "processor_config.json").write_text(json.dumps({"processor_class": processor_class}))
    return out
