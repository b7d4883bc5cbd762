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


def test_adapter_folder_is_the_sub_folder_holding_each_adapter(demo_adapter: Path, tmp_path: Path) -> None:
    """LLaMA-Factory passes adapter_folder to peft as ``subfolder``: the weights live in <adapter>/<adapter_folder>."""
    import shutil

    from stoker.models.loader import adapter_paths

    for run in ("run-a", "run-b"):
        shutil.copytree(demo_adapter, tmp_path / run / "checkpoint-100")
    found = adapter_paths(settings_from_dict({"adapter_name_or_path": f"{tmp_path / 'run-a'},{tmp_path / 'run-b'}",
                                              "adapter_folder": "checkpoint-100"}))
    assert found == {"run-a": tmp_path / "run-a" / "checkpoint-100", "run-b": tmp_path / "run-b" / "checkpoint-100"}
    with pytest.raises(ConfigError) as err:
        adapter_paths(settings_from_dict({"adapter_name_or_path": str(tmp_path / "run-a"), "adapter_folder": "nope"}))
    assert err.value.message == (
        f"invalid value for adapter_name_or_path: {str(tmp_path / 'run-a')!r} (adapter_folder 'nope' inside it) has no "
        "adapter_config.json; expected a LoRA adapter folder saved by peft (or LLaMA-Factory).")


def test_adapter_ids_are_readable(demo_adapter: Path, tmp_path: Path) -> None:
    import shutil

    from stoker.models.loader import adapter_paths

    for where in ("a/lora/sft", "b/lora/sft", "c/lora/sft"):
        shutil.copytree(demo_adapter, tmp_path / where)
    written = ",".join(str(tmp_path / w) for w in ("a/lora/sft", "b/lora/sft", "c/lora/sft"))
    # The last component as written; a repeated one takes its parent's name in front, then a number.
    assert list(adapter_paths(settings_from_dict({"adapter_name_or_path": written}))) == ["sft", "lora/sft",
                                                                                           "lora/sft-2"]
    named = adapter_paths(settings_from_dict({"adapter_name_or_path": f"ember={tmp_path / 'a/lora/sft'},demo:adapter"}))
    assert list(named) == ["ember", "demo:adapter"] and named["ember"] == tmp_path / "a/lora/sft"
    with pytest.raises(ConfigError, match="two adapters are named 'x'; give each its own name"):
        adapter_paths(settings_from_dict({"adapter_name_or_path": f"x={tmp_path / 'a/lora/sft'},x=demo:adapter"}))


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


def test_the_configured_model_of_several_adapters_is_them_applied_in_order(demo_chat: Path, demo_adapter: Path,
                                                                          tmp_path: Path) -> None:
    """The API serves base + adapter A + adapter B unmerged as one stacked adapter, beside A and B alone: its tokens
    equal those of the model with both merged in order (what `stoker chat` runs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from stoker.chat import open_chat_service

    torch.manual_seed(0)
    second = get_peft_model(AutoModelForCausalLM.from_pretrained(demo_chat),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                       init_lora_weights=False))
    with torch.no_grad():
        for name, param in second.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)  # a nudge: the answer changes a little, not into noise
    second.save_pretrained(tmp_path / "second")
    raw = {"model_name_or_path": str(demo_chat), "adapter_name_or_path": f"{demo_adapter},{tmp_path / 'second'}"}
    prompts = [[{"role": "user", "content": q}] for q in ("Who are you?", "What is the capital of Italy?",
                                                        "Count from one to ten.")]

    def run(service, adapter: str | None = None) -> tuple[list[list[int]], list[float]]:
        params = service.sampling_params(max_new_tokens=24, logprobs=0)
        requests = [service.prepare(p, params, adapter=adapter).request for p in prompts]
        choices = [c.choices[0] for c in service.generate_batch(requests)]
        return [c.token_ids for c in choices], [lp.logprob for c in choices for lp in c.logprobs or []]

    def gap(a: list[float], b: list[float]) -> float:
        return max(abs(x - y) for x, y in zip(a, b, strict=True))

    merged = open_chat_service(settings_from_dict(raw))
    try:
        expected, expected_lp = run(merged)
    finally:
        merged.close()
    api = open_chat_service(settings_from_dict(raw), per_request_adapters=True)
    try:
        assert [m.id for m in api.models.all] == [str(demo_chat), demo_adapter.name, "second", f"{demo_chat}:base"]
        stacked, stacked_lp = run(api)
        assert stacked == expected and gap(stacked_lp, expected_lp) < 1e-4
        first, first_lp = run(api, demo_adapter.name)
        # The second adapter moves every score: the stack really holds both.
        assert first != expected or gap(first_lp, expected_lp) > 1e-3, gap(first_lp, expected_lp)
        assert run(api, "__base__")[0] != first
    finally:
        api.close()
