"""The demo vision model on real vLLM: images go in as multi_modal_data and the answers match the huggingface engine.

vLLM's LLaVA code imports torchvision, which a CPU-only install usually lacks (see docs/vllm.md); without it the test
is skipped, and opening the engine is a clear ConfigError instead (checked in test_vllm_without_torchvision_is_clear).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from stoker.config import settings_from_dict
from stoker.demo.vision_tasks import QUESTIONS, Picture, answer
from stoker.errors import ConfigError

pytestmark = [
    pytest.mark.vllm,
]
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None

PICTURES = [Picture("circle", "red", 910_001, 64), Picture("cross", "blue", 910_002, 48),
            Picture("triangle", "orange", 910_003, 96)]


def vllm_settings(model: Path) -> Any:
    return settings_from_dict({"model_name_or_path": str(model), "infer_backend": "vllm", "vllm_enforce_eager": True,
                               "vllm_kv_cache_space": 1, "vllm_maxlen": 256})


def conversation(picture: Picture, question: str) -> list[dict[str, Any]]:
    import base64
    import io

    buf = io.BytesIO()
    picture.render().save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


@pytest.mark.skipif(not HAS_TORCHVISION, reason="vLLM's vision models import torchvision (see docs/vllm.md)")
def test_vllm_answers_about_pictures_like_huggingface(demo_vision: Path) -> None:
    from stoker.chat import open_chat_service

    question = QUESTIONS["describe"][0]
    vllm_service = open_chat_service(vllm_settings(demo_vision))
    try:
        requests = [vllm_service.request(conversation(p, question)) for p in PICTURES]
        # The prompt keeps one placeholder per image: vLLM's processor expands it.
        assert [r.prompt_ids.count(vllm_service.processor.image_token_id) for r in requests] == [1, 1, 1]
        ours = vllm_service.engine.generate_batch(requests)
    finally:
        vllm_service.engine.close()
    hf_service = open_chat_service(settings_from_dict({"model_name_or_path": str(demo_vision)}))
    try:
        reference = hf_service.engine.generate_batch([hf_service.request(conversation(p, question)) for p in PICTURES])
    finally:
        hf_service.engine.close()
    assert [c.choices[0].text for c in ours] == [answer("describe", p.shape, p.color) for p in PICTURES]
    assert [c.choices[0].token_ids for c in ours] == [c.choices[0].token_ids for c in reference]


@pytest.mark.skipif(HAS_TORCHVISION, reason="only without torchvision")
def test_vllm_without_torchvision_is_clear(demo_vision: Path) -> None:
    from stoker.chat import open_chat_service

    with pytest.raises(ConfigError) as exc:
        open_chat_service(vllm_settings(demo_vision))
    assert exc.value.message.startswith("vLLM's vision models need torchvision, which is not installed, to serve ")
