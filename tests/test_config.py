"""Config parsing: LLaMA-Factory keys, overrides, env, typos and bad values."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from stoker.config import (
    GREEDY_DEFAULTS,
    generation_defaults,
    load_settings,
    parse_overrides,
    settings_from_dict,
)
from stoker.errors import ConfigError

LLAMAFACTORY_INFERENCE_YAML = """\
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
adapter_name_or_path: saves/llama3-8b/lora/sft
template: llama3
infer_backend: huggingface  # choices: [huggingface, vllm, sglang]
trust_remote_code: true
"""

LLAMAFACTORY_PREDICT_YAML = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
adapter_name_or_path: saves/llama3-8b/lora/sft
trust_remote_code: true

### method
stage: sft
do_predict: true
finetuning_type: lora

### dataset
eval_dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 50
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/predict
overwrite_output_dir: true
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### eval
per_device_eval_batch_size: 1
predict_with_generate: true
ddp_timeout: 180000000
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_llamafactory_inference_yaml(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, LLAMAFACTORY_INFERENCE_YAML), env={})
    assert s.model_name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert s.adapter_name_or_path == ["saves/llama3-8b/lora/sft"]
    assert s.template == "llama3"
    assert s.backend == "huggingface"
    assert s.trust_remote_code is True


def test_llamafactory_predict_yaml_training_keys_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="stoker"):
        s = load_settings(write(tmp_path, LLAMAFACTORY_PREDICT_YAML), env={})
    assert caplog.records == []  # training-only keys are accepted silently
    assert s.eval_dataset == ["identity", "alpaca_en_demo"]
    assert (s.do_predict, s.predict_with_generate, s.max_samples, s.per_device_eval_batch_size) == (True, True, 50, 1)
    assert s.output_dir == "saves/llama3-8b/lora/predict"


def test_overrides_are_yaml_typed_and_win(tmp_path: Path) -> None:
    path = write(tmp_path, "model_name_or_path: m\ntemperature: 0.2\n")
    overrides = parse_overrides(["temperature=0.7", "--max_new_tokens", "16", "--do_sample", "adapter_name_or_path=a,b"])
    s = load_settings(path, overrides, env={})
    assert (s.temperature, s.max_new_tokens, s.do_sample) == (0.7, 16, True)
    assert s.adapter_name_or_path == ["a", "b"]


def test_override_without_equals_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"unexpected argument 'oops': overrides are written key=value"):
        parse_overrides(["oops"])


def test_typo_warns_with_nearest_key(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="stoker"):
        settings_from_dict({"temprature": 0.5})
    assert [r.getMessage() for r in caplog.records] == [
        "unknown config key 'temprature' ignored; did you mean 'temperature'?"
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"temperature": "hot"}, "invalid value for temperature: 'hot'; expected a number or null."),
        ({"max_new_tokens": 1.5}, "invalid value for max_new_tokens: 1.5; expected an integer or null."),
        ({"do_sample": "yes please"}, "invalid value for do_sample: 'yes please'; expected true or false or null."),
        (
            {"infer_backend": "ollama"},
            "invalid value for infer_backend: 'ollama'; expected one of 'huggingface', 'hf', 'vllm'.",
        ),
        ({"top_p": 1.5}, "invalid value for top_p: 1.5; expected a number in (0, 1]."),
        ({"max_new_tokens": 0}, "invalid value for max_new_tokens: 0; expected an integer >= 1."),
        ({"api_port": 70000}, "invalid value for api_port: 70000; expected a port number from 1 to 65535."),
        ({"api_max_body_mb": 0}, "invalid value for api_max_body_mb: 0; expected an integer >= 1."),
        ({"cpu_matmul": "fast"},
         "invalid value for cpu_matmul: 'fast'; expected one of 'auto', 'packed', 'stock', 'int8', 'int4'."),
        ({"prefix_cache_tokens": -1}, "invalid value for prefix_cache_tokens: -1; expected a number of tokens >= 0 "
                                      "(0 turns the prefix cache off)."),
        ({"torch_threads": -2}, "invalid value for torch_threads: -2; expected a number of CPU threads >= 1, or 0 for "
                                "the default (OMP_NUM_THREADS if set, else one per physical core)."),
        ({"vllm_config": "{not json"}, "invalid value for vllm_config: '{not json'; expected a mapping or a JSON object string."),
    ],
)
def test_bad_values_name_key_value_and_allowed(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_dict(raw)
    assert info.value.message == message


def test_env_fills_api_settings_unless_yaml_sets_them(tmp_path: Path) -> None:
    env = {"API_PORT": "9001", "API_KEY": "sk-test", "API_HOST": "127.0.0.1"}
    s = load_settings(write(tmp_path, "API_HOST: 127.0.0.2\n"), env=env)
    assert (s.api_host, s.api_port, s.api_key) == ("127.0.0.2", 9001, "sk-test")


def test_vllm_config_json_string() -> None:
    s = settings_from_dict({"vllm_config": '{"max_num_seqs": 8}'})
    assert s.vllm_config == {"max_num_seqs": 8}


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_non_mapping_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must hold a mapping of keys to values"):
        load_settings(write(tmp_path, "- a\n- b\n"), env={})


def test_generation_defaults_rule() -> None:
    # Nothing anywhere: greedy.
    assert generation_defaults(settings_from_dict({}), None) == GREEDY_DEFAULTS
    # The model's generation_config.json fills unset keys.
    model_gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 100}
    resolved = generation_defaults(settings_from_dict({}), model_gen)
    assert resolved == {**GREEDY_DEFAULTS, "do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 100}
    # The YAML wins over the model.
    resolved = generation_defaults(settings_from_dict({"do_sample": False, "top_p": 0.5}), model_gen)
    assert (resolved["do_sample"], resolved["top_p"], resolved["temperature"]) == (False, 0.5, 0.6)


def test_adapters_need_lora() -> None:
    with pytest.raises(ConfigError, match="adapters need finetuning_type: lora"):
        settings_from_dict({"adapter_name_or_path": "x", "finetuning_type": "full"})
