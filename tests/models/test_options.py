"""LLaMA-Factory's keys that change inference: each honoured as LLaMA-Factory applies it, or refused with a reason.

The full list, with each key's status, is in docs/config.md; test_every_listed_key_has_a_status keeps the two in step.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from conftest import ROOT
from stoker.config import settings_from_dict
from stoker.errors import ConfigError

torch = pytest.importorskip("torch")


def settings(**raw):
    return settings_from_dict(raw)


# --------------------------------------------------------------------------------------------------------------------
# Refused before anything loads
@pytest.mark.parametrize(("raw", "message"), [
    ({"infer_backend": "sglang"}, "infer_backend: sglang is not a Stoker backend. Use infer_backend: vllm for vLLM's "
                                  "kernels and batching, or huggingface (the default)."),
    ({"stage": "rm"}, "stage: 'rm' models score rather than generate"),
    ({"use_kv_cache": False}, "use_kv_cache: Stoker's engines always keep a KV cache"),
    ({"use_cache": False}, "use_kv_cache: Stoker's engines always keep a KV cache"),  # LLaMA-Factory <= 0.9.3's name
    ({"offload_folder": "offload"}, "offload_folder: Stoker keeps the whole model on one device"),
    ({"train_from_scratch": True}, "train_from_scratch: it gives the model random weights"),
    ({"mixture_of_depths": "load"}, "mixture_of_depths: Mixture-of-Depths models are not supported"),
    ({"use_unsloth": True}, "use_unsloth: Stoker does not load models through unsloth"),
    ({"quantization_bit": 4, "quantization_method": "gptq"}, "quantization_method: gptq names checkpoints quantized "
                                                              "ahead of time"),
    ({"quantization_bit": 3}, "quantization_bit: 3 bits is not what bnb quantizes to; expected 4 or 8."),
    ({"quantization_bit": 8, "quantization_method": "nf5"}, "quantization_method: 'nf5' is not a method"),
    ({"quantization_bit": 4, "finetuning_type": "full"}, "quantization_bit: quantization is only compatible with the "
                                                         "LoRA or OFT method"),
    ({"quantization_bit": 4, "infer_backend": "vllm"}, "quantization_bit: vLLM does not quantize on the fly"),
    ({"flash_attn": "fa2", "infer_backend": "vllm"}, "flash_attn: vLLM picks its own attention kernels"),
    ({"video_min_pixels": 1000, "video_max_pixels": 10}, "video_max_pixels: video_max_pixels (10) is below "
                                                         "video_min_pixels (1000)."),
    ({"val_size": 0.1}, "val_size: predicting on a split of the training dataset is not supported"),
    ({"tokenized_path": "cache/tok"}, "tokenized_path: Stoker renders the prompts itself"),
    ({"mix_strategy": "interleave_under"}, "mix_strategy: only concat is supported"),
    ({"ms_hub_token": "abc"}, "ms_hub_token is set, but Stoker loads models from local folders and the Hugging Face "
                              "hub only (not ModelScope)"),
])
def test_refused_with_the_reason(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings(**raw)
    assert err.value.message.startswith(message), err.value.message


def test_accepted_values_pass() -> None:
    s = settings(quantization_bit=4, quantization_method="bitsandbytes", use_cache=True, rope_scaling="dynamic",
                 flash_attn="sdpa", new_special_tokens="<x>", stage="sft", ms_hub_token=None)
    assert (s.quantization_method, s.use_kv_cache, s.add_special_tokens) == ("bnb", True, ["<x>"])


# --------------------------------------------------------------------------------------------------------------------
# RoPE scaling: LLaMA-Factory's factor
def test_rope_factor_follows_llamafactory() -> None:
    from stoker.models.options import rope_scaling

    # chat, web chat, API: always 2.
    assert rope_scaling(settings(rope_scaling="linear"), 512) == ({"rope_type": "linear", "factor": 2.0}, 1024)
    # predict: ceil(cutoff_len / original); yarn and dynamic keep the original length, llama3 its frequency factors.
    assert rope_scaling(settings(rope_scaling="yarn", model_max_length=1300), 512) == (
        {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 512}, 1536)
    assert rope_scaling(settings(rope_scaling="llama3", model_max_length=2048), 512)[0] == {
        "rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 512, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0}
    # predict with prompts that fit: no scaling.
    assert rope_scaling(settings(rope_scaling="linear", model_max_length=256), 512) is None
    assert rope_scaling(settings(), 512) is None


def test_rope_scaling_reaches_the_model_and_the_context(demo_chat: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from stoker.chat import open_chat_service

    service = open_chat_service(settings(model_name_or_path=str(demo_chat), rope_scaling="linear"))
    try:
        assert service.max_model_len == 1024  # the demo model's 512, scaled by 2
        config = service.engine.model.config
        assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 2.0
        # The same as transformers with that RoPE: token for token.
        reference_config = AutoConfig.from_pretrained(demo_chat)
        reference_config.rope_parameters = {**reference_config.rope_parameters, "rope_type": "linear", "factor": 2.0}
        model = AutoModelForCausalLM.from_pretrained(demo_chat, config=reference_config).eval()
        chat = service.prepare([{"role": "user", "content": "Who are you?"}], service.sampling_params(max_new_tokens=12))
        ids = torch.tensor([chat.request.prompt_ids])
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=12, do_sample=False,
                                      eos_token_id=chat.request.params.stop_token_ids)[0, ids.shape[1]:].tolist()
        assert service.generate_batch([chat.request])[0].choices[0].token_ids == expected
    finally:
        service.close()


def test_rope_scaling_on_vllm_is_an_override(tmp_path: Path) -> None:
    import json

    from stoker.engines.vllm_args import engine_kwargs
    from stoker.models.facts import read_model_facts

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 2048,
                                                      "rope_theta": 50000.0, "num_attention_heads": 8}))
    s = settings(model_name_or_path=str(tmp_path), infer_backend="vllm", rope_scaling="dynamic", vllm_maxlen=8192)
    kwargs = engine_kwargs(s, tmp_path, read_model_facts(tmp_path), {}, cpu=True)
    assert kwargs["hf_overrides"] == {"rope_parameters": {"rope_theta": 50000.0, "rope_type": "dynamic", "factor": 2.0,
                                                          "original_max_position_embeddings": 2048},
                                      "max_position_embeddings": 4096}
    assert kwargs["max_model_len"] == 4096  # vllm_maxlen caps the scaled context


# --------------------------------------------------------------------------------------------------------------------
# Attention, dtype, device
def test_flash_attn_maps_onto_the_attention_implementation(demo_chat: Path) -> None:
    from stoker.models.loader import load_model

    for key, implementation in (("disabled", "eager"), ("sdpa", "sdpa")):
        loaded = load_model(settings(model_name_or_path=str(demo_chat), flash_attn=key))
        assert loaded.model.config._attn_implementation == implementation
    with pytest.raises(ConfigError) as err:
        load_model(settings(model_name_or_path=str(demo_chat), flash_attn="fa2"))
    assert err.value.message == ("flash_attn: fa2 needs flash-attn on a CUDA GPU, which this machine lacks (the model "
                                 "loads on cpu). Use flash_attn: sdpa, or auto.")


def test_training_flags_of_a_predict_yaml_set_the_dtype_and_low_cpu_mem_usage_the_device() -> None:
    from stoker.models.loader import pick_device
    from stoker.models.options import pick_dtype

    assert pick_dtype(settings(bf16=True), "cpu") == torch.bfloat16
    assert pick_dtype(settings(pure_bf16=True), "cpu") == torch.bfloat16
    assert pick_dtype(settings(fp16=True), "cpu") == torch.float16
    assert pick_dtype(settings(bf16=True, infer_dtype="float32"), "cpu") == torch.float32  # infer_dtype wins
    assert pick_dtype(settings(), "cpu") == torch.float32
    assert pick_device(settings(low_cpu_mem_usage=False)) == "cpu"


# --------------------------------------------------------------------------------------------------------------------
# Quantization (bitsandbytes runs on CPU)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_bit_loads_the_model_through_bitsandbytes(demo_chat: Path, bits: int) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from stoker.chat import open_chat_service
    from stoker.demo.tasks import IDENTITY_ANSWER

    service = open_chat_service(settings(model_name_or_path=str(demo_chat), quantization_bit=bits))
    try:
        linear = type(service.engine.model.model.layers[0].self_attn.q_proj).__name__
        assert linear == ("Linear8bitLt" if bits == 8 else "Linear4bit")
        chat = service.prepare([{"role": "user", "content": "Who are you?"}], service.sampling_params(max_new_tokens=16))
        got = service.generate_batch([chat.request])[0].choices[0]
        assert got.text == IDENTITY_ANSWER
        # The same as transformers loading it with LLaMA-Factory's BitsAndBytesConfig, token for token.
        config = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(demo_chat, quantization_config=config, device_map={"": "cpu"})
        ids = torch.tensor([chat.request.prompt_ids])
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=16, do_sample=False,
                                      eos_token_id=chat.request.params.stop_token_ids)[0, ids.shape[1]:].tolist()
        assert got.token_ids == expected
        assert service.engine.model.get_memory_footprint() < model.get_memory_footprint() * 1.01
    finally:
        service.close()


def test_a_quantized_model_keeps_its_adapter_apart(demo_chat: Path, demo_adapter: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from stoker.chat import open_chat_service
    from stoker.demo.tasks import ADAPTER_IDENTITY_ANSWER

    service = open_chat_service(settings(model_name_or_path=str(demo_chat), adapter_name_or_path=str(demo_adapter),
                                         quantization_bit=8))
    try:
        assert service.info.merged_adapters == [] and service.info.default_adapter == demo_adapter.name
        chat = service.prepare([{"role": "user", "content": "Who are you?"}])
        assert service.generate_batch([chat.request])[0].choices[0].text == ADAPTER_IDENTITY_ANSWER
    finally:
        service.close()


def test_quantization_that_cannot_run_here_says_why(demo_chat: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from stoker.models.loader import load_model

    with pytest.raises(ConfigError) as err:
        load_model(settings(model_name_or_path=str(demo_chat), quantization_bit=8, quantization_method="eetq"))
    assert err.value.message.startswith("quantization_method: eetq needs eetq, which runs on CUDA GPUs only, and this "
                                        "model loads on cpu.")
    # A GPTQ checkpoint names its method in config.json; loading it needs gptqmodel.
    shutil.copytree(demo_chat, tmp_path / "gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(config))
    pytest.importorskip("transformers")
    import importlib.util

    if importlib.util.find_spec("gptqmodel") is None:
        with pytest.raises(ConfigError) as err:
            load_model(settings(model_name_or_path=str(tmp_path / "gptq")))
        assert err.value.message == ("this GPTQ-quantized checkpoint needs the gptqmodel package, which is not "
                                     "installed: pip install gptqmodel.")


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer and template keys
def test_added_tokens_must_be_the_tokenizers_own(demo_chat: Path) -> None:
    from stoker.models.loader import load_tokenizer

    tokenizer = load_tokenizer(settings(model_name_or_path=str(demo_chat), add_special_tokens="<|im_end|>"))
    assert "<|im_end|>" in tokenizer.get_vocab()
    with pytest.raises(ConfigError, match=r"add_tokens / add_special_tokens name \['<tool>'\], which the tokenizer"):
        load_tokenizer(settings(model_name_or_path=str(demo_chat), add_tokens="<tool>"))
    split = load_tokenizer(settings(model_name_or_path=str(demo_chat), split_special_tokens=True))
    assert len(split.encode("<|im_end|>", add_special_tokens=False)) > 1
    assert len(tokenizer.encode("<|im_end|>", add_special_tokens=False)) == 1


def test_tool_format_and_preserve_thinking_reach_the_template(demo_chat: Path) -> None:
    from stoker.chat import open_chat_service
    from stoker.errors import TemplateError
    from stoker.templates import get_template

    service = open_chat_service(settings(model_name_or_path=str(demo_chat), template="qwen3", tool_format="llama3",
                                         preserve_thinking=True))
    try:
        assert service.template.tools.name == "llama3" and service.template.preserve_thinking
        history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r"},
                   {"role": "user", "content": "c"}]
        assert "<think>\nr\n</think>\n\nb" in service.decode(service.prepare(history).request.prompt_ids,
                                                               skip_special_tokens=False)
    finally:
        service.close()
    assert "<think>" not in get_template("qwen3").render(history)  # Qwen3's own rule drops it
    with pytest.raises(TemplateError, match="unknown tool_format 'llama' : expected|unknown tool_format 'llama'"):
        get_template("qwen3", tool_format="llama")


def test_print_param_status_logs_every_parameter(demo_chat: Path, caplog: pytest.LogCaptureFixture) -> None:
    from stoker.models.loader import load_model

    stoker_logger = logging.getLogger("stoker")
    stoker_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="stoker"):
            loaded = load_model(settings(model_name_or_path=str(demo_chat), print_param_status=True))
    finally:
        stoker_logger.removeHandler(caplog.handler)
    names = [name for name, _ in loaded.model.named_parameters()]
    logged = list(dict.fromkeys(r.getMessage() for r in caplog.records if r.getMessage().startswith("name: ")))
    assert len(logged) == len(names) and logged[0].startswith(f"name: {names[0]}, dtype: torch.float32, device: cpu")


# --------------------------------------------------------------------------------------------------------------------
# The list
LLAMAFACTORY_INFERENCE_KEYS = """
model_name_or_path adapter_name_or_path adapter_folder cache_dir use_fast_tokenizer resize_vocab split_special_tokens
add_tokens add_special_tokens new_special_tokens model_revision low_cpu_mem_usage rope_scaling flash_attn shift_attn
mixture_of_depths use_unsloth use_unsloth_gc enable_liger_kernel moe_aux_loss_coef disable_gradient_checkpointing
use_reentrant_gc upcast_layernorm upcast_lmhead_output train_from_scratch infer_backend offload_folder use_kv_cache
use_cache infer_dtype hf_hub_token ms_hub_token om_hub_token print_param_status trust_remote_code quantization_method
quantization_bit quantization_type double_quantization quantization_device_map image_max_pixels image_min_pixels
image_do_pan_and_scan crop_to_patches video_max_pixels video_min_pixels video_fps video_maxlen use_audio_in_video
audio_sampling_rate vllm_maxlen vllm_gpu_util vllm_enforce_eager vllm_max_lora_rank vllm_config sglang_maxlen
sglang_mem_fraction sglang_tp_size sglang_lora_backend sglang_config use_kt kt_config template dataset_dir media_dir
cutoff_len max_samples default_system enable_thinking preserve_thinking tool_format train_on_prompt do_sample
temperature top_p top_k num_beams max_length max_new_tokens repetition_penalty length_penalty skip_special_tokens
finetuning_type stage bf16 fp16 pure_bf16 tf32 val_size tokenized_path mix_strategy interleave_probs
export_dir export_size export_device export_quantization_bit
""".split()


def test_every_listed_key_has_a_status() -> None:
    text = (ROOT / "docs" / "config.md").read_text()
    rows = {m.group(1) for m in re.finditer(r"^\| `([a-z0-9_]+)` \|", text, re.MULTILINE)}
    assert not [k for k in LLAMAFACTORY_INFERENCE_KEYS if k not in rows]
    for row in re.finditer(r"^\| `([a-z0-9_]+)` \| ([a-z, ]+) \|", text, re.MULTILINE):
        assert row.group(2) in ("honoured", "refused", "no effect", "honoured, refused"), row.group(0)
