"""Qwen2-VL style models in the huggingface engine: multimodal RoPE positions at prefill and their offsets in decode.

A tiny randomly initialised Qwen2VLForConditionalGeneration is enough: greedy decoding is deterministic, so the
engine's batched, left-padded output must equal transformers' ``generate`` run one request at a time, token for token.
(Qwen2-VL's processor needs torchvision's video processor in transformers 5; the prompt is built here the way it
expands: ``<|vision_start|>`` + one ``<|image_pad|>`` per 2x2 merged patch + ``<|vision_end|>``.)
"""

from __future__ import annotations

from typing import Any

import pytest

from stoker.demo.vision_tasks import Picture

SPECIALS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any, Any]:
    import torch
    from tokenizers import AddedToken
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from stoker.demo.tokenizer import IM_END, train_tokenizer

    text = "What shape is this? Describe the image. hello world assistant system user"
    tokenizer = train_tokenizer([[{"role": "user", "content": text}]], 300, max_length=1024)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS], special_tokens=True)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "max_position_embeddings": 1024, "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
                     "eos_token_id": tokenizer.convert_tokens_to_ids(IM_END), "pad_token_id": 0, "bos_token_id": None},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 128, "num_heads": 2, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    return model, tokenizer, image_processor


def prompt_ids(tokenizer: Any, image_tokens: int, text: str) -> list[int]:
    image = "<|vision_start|>" + "<|image_pad|>" * image_tokens + "<|vision_end|>" if image_tokens else ""
    chat = f"<|im_start|>user\n{image}{text}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer(chat, add_special_tokens=False)["input_ids"]


def test_engine_matches_generate_with_mrope(tiny: tuple[Any, Any, Any]) -> None:
    import torch

    from stoker.engines.base import GenerationRequest, SamplingParams
    from stoker.engines.hf import HFEngine

    model, tokenizer, image_processor = tiny
    image_id = model.config.image_token_id
    pictures = [Picture("circle", "red", 1, 112).render(), None, Picture("square", "blue", 2, 100).render().resize((112, 56))]
    texts = ["What shape is this?", "hello world hello world system", "Describe the image."]
    rows = []
    for picture, text in zip(pictures, texts, strict=True):
        if picture is None:
            rows.append((prompt_ids(tokenizer, 0, text), None))
            continue
        inputs = dict(image_processor([picture], return_tensors="pt"))
        count = int(inputs["image_grid_thw"][0].prod()) // 4
        media = {"images": [picture], "inputs": inputs, "image_token_id": image_id, "image_tokens": count}
        rows.append((prompt_ids(tokenizer, count, text), media))
    # Images of 8x8 and 8x4 merged patches: positions after them lag the token count by 12 and 8, so a decode step
    # at the wrong position would change the logits.
    assert [m["image_tokens"] if m else 0 for _, m in rows] == [16, 0, 8]

    eos = model.config.text_config.eos_token_id
    reference = []
    for ids, media in rows:
        x = torch.tensor([ids])
        extra = {**media["inputs"], "mm_token_type_ids": (x == image_id).int()} if media else {}
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12,
                                 eos_token_id=eos, pad_token_id=0, **extra)
        reference.append(out[0, len(ids):].tolist())

    engine = HFEngine(model, tokenizer)
    try:
        assert engine.info.vision
        params = SamplingParams(max_new_tokens=12)
        got = engine.generate_batch([GenerationRequest(prompt_ids=ids, params=params, media=m) for ids, m in rows])
    finally:
        engine.close()
    assert [c.choices[0].token_ids for c in got] == reference
