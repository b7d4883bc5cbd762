"""Model loading and generation on real models: stories260K (trained by someone else) and the demo models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import STORIES
from stoker.config import settings_from_dict
from stoker.errors import ConfigError, ModelLoadError


def chat_service(**raw):
    from stoker.chat import open_chat_service

    return open_chat_service(settings_from_dict(raw))


def greedy_ids(service, messages, max_new_tokens):
    request = service.request(messages, service.sampling_params(max_new_tokens=max_new_tokens))
    completion = service.engine.generate_batch([request])[0]
    return request.prompt_ids, completion.choices[0]


def test_stories260k_continues_the_known_story(shared_dir: Path) -> None:
    sample = json.loads((shared_dir / "models/stories260K/sample_generation.json").read_text())
    service = chat_service(model_name_or_path=str(STORIES), template="empty")
    try:
        new_tokens = len(sample["generated_ids"]) - len(sample["prompt_ids"])
        prompt_ids, choice = greedy_ids(service, [{"role": "user", "content": sample["prompt"]}], new_tokens)
        assert prompt_ids == sample["prompt_ids"]
        assert prompt_ids + choice.token_ids == sample["generated_ids"]
        assert sample["prompt"] + choice.text == sample["text"]
        assert choice.finish_reason == "length"
    finally:
        service.engine.close()


def test_dtype_auto_is_float32_on_cpu() -> None:
    import torch

    from stoker.models.loader import load_model

    loaded = load_model(settings_from_dict({"model_name_or_path": str(STORIES)}))
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.generation_config["eos_token_id"] == 2


def test_adapter_changes_identity(demo_chat: Path, demo_adapter: Path) -> None:
    from stoker.demo.tasks import ADAPTER_IDENTITY_ANSWER, IDENTITY_ANSWER

    question = [{"role": "user", "content": "Who are you?"}]
    cases = [({}, IDENTITY_ANSWER), ({"adapter_name_or_path": str(demo_adapter)}, ADAPTER_IDENTITY_ANSWER),
             ({"adapter_name_or_path": str(demo_adapter), "merge_adapters": False}, ADAPTER_IDENTITY_ANSWER)]
    for extra, answer in cases:
        service = chat_service(model_name_or_path=str(demo_chat), **extra)
        try:
            assert service.engine.info.adapters == ([Path(demo_adapter).name] if extra.get("merge_adapters") is False
                                                    else [])
            _, choice = greedy_ids(service, question, 32)
            assert (choice.text, choice.finish_reason) == (answer, "stop"), extra
        finally:
            service.engine.close()


def test_adapter_folder_adds_its_adapters_sorted_after_the_named_ones(demo_adapter: Path, tmp_path: Path) -> None:
    import shutil

    from stoker.models.loader import adapter_paths

    for name in ("b-second", "a-first"):
        shutil.copytree(demo_adapter, tmp_path / "folder" / name)
    (tmp_path / "folder" / "notes").mkdir()  # not an adapter: skipped
    found = adapter_paths(settings_from_dict({"adapter_name_or_path": str(demo_adapter),
                                              "adapter_folder": str(tmp_path / "folder")}))
    assert list(found.values()) == [demo_adapter, tmp_path / "folder" / "a-first", tmp_path / "folder" / "b-second"]
    assert len(set(found)) == 3


def test_unmerged_adapters_cannot_be_stacked(demo_chat: Path, demo_adapter: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(demo_adapter, tmp_path / "again")
    with pytest.raises(ConfigError, match="merge_adapters: false keeps an adapter apart from the weights, but "
                                          "adapter_name_or_path lists 2"):
        chat_service(model_name_or_path=str(demo_chat), adapter_name_or_path=f"{demo_adapter},{tmp_path / 'again'}",
                     merge_adapters=False)


def test_adapter_for_another_model_is_a_clear_error(demo_adapter: Path) -> None:
    from stoker.models.loader import load_model

    with pytest.raises(ModelLoadError) as info:
        load_model(settings_from_dict({"model_name_or_path": str(STORIES), "adapter_name_or_path": str(demo_adapter)}))
    assert info.value.message.startswith(f"the adapter '{demo_adapter}' does not fit the base model: ")
    assert info.value.message.endswith("Check that it was trained on this model_name_or_path.")


def test_adapter_folder_without_config(tmp_path: Path) -> None:
    from stoker.models.loader import adapter_paths

    with pytest.raises(ConfigError, match="has no adapter_config.json; expected a LoRA adapter folder"):
        adapter_paths(settings_from_dict({"adapter_name_or_path": str(tmp_path)}))


def test_demo_alias_resolves(demo_chat: Path) -> None:
    from stoker.models.loader import resolve_model_path

    assert resolve_model_path("demo:chat") == demo_chat
    with pytest.raises(ConfigError, match="invalid value for model_name_or_path: 'demo:nope'; the demo models are demo:chat"):
        resolve_model_path("demo:nope")


def test_greedy_equals_transformers_generate(demo_chat: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stoker.demo.tasks import FACTS

    service = chat_service(model_name_or_path=str(demo_chat), repetition_penalty=1.0)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(demo_chat))
        tokenizer = AutoTokenizer.from_pretrained(str(demo_chat))
        for question in list(FACTS)[-3:]:
            messages = [{"role": "user", "content": question}]
            prompt_ids, choice = greedy_ids(service, messages, 24)
            reference = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            reference = reference["input_ids"] if isinstance(reference, dict) or hasattr(reference, "keys") else reference
            assert prompt_ids == list(reference)
            out = model.generate(
                torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=24, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            expected = out[0, len(prompt_ids):].tolist()
            if expected and expected[-1] == tokenizer.eos_token_id:
                expected = expected[:-1]
            assert [t for t in choice.token_ids if t != tokenizer.eos_token_id] == expected
    finally:
        service.engine.close()
