"""One validated settings object, built from a YAML file, ``key=value`` overrides and environment variables.

Keys follow LLaMA-Factory's inference and predict YAMLs, so its users can bring their files unchanged. The object is
flat, like those files. Generation keys default to ``None`` ("unset"): the model's ``generation_config.json`` fills
them in, and without one decoding is greedy (see ``generation_defaults``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stoker.errors import ConfigError

logger = logging.getLogger("stoker")


@dataclass
class Settings:
    # --- model -------------------------------------------------------------------------------------------------
    model_name_or_path: str | None = None
    adapter_name_or_path: list[str] = field(default_factory=list)  # comma list in YAML; applied in order
    adapter_folder: str | None = None  # every sub-folder holding an adapter_config.json is an adapter
    finetuning_type: Literal["lora", "full", "freeze"] = "lora"
    merge_adapters: bool = True  # merge LoRA into the weights for speed where nothing needs them separate
    template: str | None = None  # None or "auto": the tokenizer's own chat_template
    infer_backend: Literal["huggingface", "hf", "vllm"] = "huggingface"
    infer_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    trust_remote_code: bool = False
    cache_dir: str | None = None
    model_revision: str = "main"
    use_fast_tokenizer: bool = True
    hf_hub_token: str | None = None
    # --- prompt ------------------------------------------------------------------------------------------------
    default_system: str | None = None
    enable_thinking: bool | None = True
    # --- generation (None = unset: taken from generation_config.json, else greedy) -------------------------------
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    num_beams: int = 1
    max_new_tokens: int | None = None
    max_length: int | None = None
    repetition_penalty: float | None = None
    length_penalty: float = 1.0
    skip_special_tokens: bool = True
    seed: int | None = None
    # --- engine ------------------------------------------------------------------------------------------------
    max_num_seqs: int = 64  # requests batched together
    max_batch_tokens: int = 65536  # prompt + new tokens of all running requests
    max_queue: int = 256  # waiting requests beyond this get HTTP 429
    cpu_matmul: Literal["auto", "packed", "stock"] = "auto"  # oneDNN with prepacked weights on CPU (engines.cpu_linear)
    # --- vLLM ----------------------------------------------------------------------------------------------------
    vllm_maxlen: int = 4096
    vllm_gpu_util: float = 0.9
    vllm_enforce_eager: bool = False
    vllm_max_lora_rank: int = 32
    vllm_config: dict[str, Any] = field(default_factory=dict)
    vllm_tensor_parallel_size: int | None = None
    vllm_kv_cache_space: float | None = None  # GiB, CPU only
    # --- vision --------------------------------------------------------------------------------------------------
    visual_inputs: bool | None = None
    image_max_pixels: int = 768 * 768
    image_min_pixels: int = 32 * 32
    image_max_bytes: int = 20 * 1024 * 1024
    media_dir: str | None = None
    allow_private_urls: bool = False
    # --- data and predict ------------------------------------------------------------------------------------------
    stage: Literal["sft", "pt", "rm", "ppo", "dpo", "kto"] = "sft"
    do_train: bool = False
    do_eval: bool = False
    do_predict: bool = False
    predict_with_generate: bool = False
    dataset: list[str] = field(default_factory=list)
    eval_dataset: list[str] = field(default_factory=list)
    dataset_dir: str = "data"
    eval_on_each_dataset: bool = False
    max_samples: int | None = None
    cutoff_len: int = 2048
    on_bad_row: Literal["skip", "error"] = "error"
    output_dir: str | None = None
    overwrite_output_dir: bool = False
    per_device_eval_batch_size: int = 8
    # --- API server ------------------------------------------------------------------------------------------------
    api_host: str = "0.0.0.0"
    api_port: int = 8000
    api_key: str | None = None
    api_model_name: str | None = None
    api_max_body_mb: int = 64  # request bodies above this many MiB get HTTP 413
    # --- web chat ----------------------------------------------------------------------------------------------------
    gradio_server_name: str = "127.0.0.1"
    gradio_server_port: int = 7860
    gradio_share: bool = False

    # Where the settings came from, for messages and for resolving relative paths.
    source: str | None = field(default=None, repr=False)

    @property
    def backend(self) -> Literal["huggingface", "vllm"]:
        return "vllm" if self.infer_backend == "vllm" else "huggingface"

    def fingerprint(self, keys: list[str]) -> dict[str, Any]:
        """The values of ``keys``, JSON-safe; used to tell whether saved output came from the same config."""
        return {k: _jsonable(getattr(self, k)) for k in keys}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# Keys that only matter to training. LLaMA-Factory YAMLs carry them; we accept and ignore them.
TRAINING_ONLY_KEYS = frozenset(
    """
    deepspeed ddp_timeout overwrite_cache preprocessing_num_workers dataloader_num_workers learning_rate
    num_train_epochs max_steps lr_scheduler_type warmup_ratio warmup_steps weight_decay bf16 fp16 pure_bf16 tf32
    logging_steps save_steps save_strategy save_total_limit save_only_model plot_loss gradient_accumulation_steps
    per_device_train_batch_size gradient_checkpointing lora_rank lora_alpha lora_dropout lora_target additional_target
    use_dora use_rslora pissa_init loraplus_lr_ratio freeze_trainable_layers freeze_trainable_modules val_size
    eval_strategy evaluation_strategy eval_steps resume_from_checkpoint report_to run_name flash_attn shift_attn
    rope_scaling quantization_bit quantization_method upcast_layernorm neftune_noise_alpha packing
    neat_packing train_on_prompt mask_history tokenized_path streaming buffer_size mix_strategy interleave_probs
    include_num_input_tokens_seen ddp_find_unused_parameters optim max_grad_norm adam_beta1 adam_beta2
    disable_gradient_checkpointing use_unsloth enable_liger_kernel pref_beta pref_loss dpo_label_smoothing
    ref_model reward_model logging_dir load_best_model_at_end metric_for_best_model greater_is_better
    use_cache low_cpu_mem_usage print_param_status compute_accuracy mixture_of_depths moe_aux_loss_coef
    """.split()
)

# Keys under other names in LLaMA-Factory or transformers, mapped onto ours.
ALIASES = {"model_name": "api_model_name", "vllm_max_lora_rank": "vllm_max_lora_rank", "overwrite": "overwrite_output_dir"}

# Environment variables read when the YAML does not set the key.
ENV_KEYS = {
    "api_host": "API_HOST",
    "api_port": "API_PORT",
    "api_key": "API_KEY",
    "api_model_name": "API_MODEL_NAME",
    "api_max_body_mb": "API_MAX_BODY_MB",
    "gradio_server_name": "GRADIO_SERVER_NAME",
    "gradio_server_port": "GRADIO_SERVER_PORT",
    "gradio_share": "GRADIO_SHARE",
}

_FIELDS = {f.name: f for f in dataclasses.fields(Settings) if f.name != "source"}
_HINTS = typing.get_type_hints(Settings)
_LIST_KEYS = {"adapter_name_or_path", "dataset", "eval_dataset"}


def known_keys() -> list[str]:
    return sorted(_FIELDS)


def load_settings(
    path: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    env: dict[str, str] | None = None,
) -> Settings:
    """Build Settings from an optional YAML file, then overrides (already YAML-typed), then environment defaults."""
    raw: dict[str, Any] = {}
    source = None
    if path is not None:
        raw = read_yaml(Path(path))
        source = str(path)
    raw.update(overrides or {})
    env = dict(os.environ) if env is None else env
    for key, var in ENV_KEYS.items():
        if key not in raw and key.upper() not in raw and var in env:
            raw[key] = _yaml_value(env[var])
    return settings_from_dict(raw, source=source)


def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file not found: {path}. Pass the path of a YAML file, e.g. examples/inference/demo.yaml.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values (key: value lines), not {type(data).__name__}.")
    return data


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``key=value`` and ``--key value`` / ``--key=value`` arguments, values typed as YAML."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--") and "=" not in args[i + 1]:
                key, value = body, args[i + 1]
                i += 1
            else:
                key, value = body, "true"
        elif "=" in arg:
            key, value = arg.split("=", 1)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: overrides are written key=value (e.g. temperature=0.7).")
        out[key.strip().replace("-", "_")] = _yaml_value(value)
        i += 1
    return out


def _yaml_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def settings_from_dict(raw: dict[str, Any], *, source: str | None = None) -> Settings:
    values: dict[str, Any] = {}
    where = f" in {source}" if source else ""
    for key, value in raw.items():
        name = str(key)
        lowered = name.lower()
        if lowered in _FIELDS and name not in _FIELDS:
            name = lowered  # API_HOST, API_PORT ... written in the YAML as the env var names
        name = ALIASES.get(name, name)
        if name in _FIELDS:
            values[name] = coerce(name, value)
        elif name in TRAINING_ONLY_KEYS:
            logger.debug("ignoring training-only key %s%s", name, where)
        else:
            close = difflib.get_close_matches(name, list(_FIELDS) + sorted(TRAINING_ONLY_KEYS), n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            logger.warning("unknown config key %r%s ignored%s", name, where, hint)
    settings = Settings(**values, source=source)
    _check(settings)
    return settings


def coerce(key: str, value: Any) -> Any:
    """Check ``value`` against the type of ``key``; convert where the meaning is unambiguous."""
    hint = _HINTS[key]
    try:
        return _coerce(hint, value, key)
    except _Mismatch as exc:
        raise ConfigError(f"invalid value for {key}: {value!r}; expected {exc.expected}.") from None


class _Mismatch(Exception):
    def __init__(self, expected: str):
        self.expected = expected


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None:
            return None
        expected = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except _Mismatch as exc:
                expected.append(exc.expected)
        raise _Mismatch(" or ".join(expected) + " or null")
    if origin is Literal:
        if value in args:
            return value
        raise _Mismatch("one of " + ", ".join(repr(a) for a in args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch("a number")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch("a string")
    if origin is list:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise _Mismatch("a comma-separated string or a list of strings")
    if origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise _Mismatch("a mapping or a JSON object string") from None
        if isinstance(value, dict):
            return value
        raise _Mismatch("a mapping or a JSON object string")
    raise _Mismatch(str(hint))  # pragma: no cover - every field type is handled above


def _check(s: Settings) -> None:
    """Rules between keys and ranges that a type alone cannot say."""
    positive = ["max_num_seqs", "max_batch_tokens", "max_queue", "per_device_eval_batch_size", "cutoff_len", "num_beams",
                "api_max_body_mb"]
    for key in positive:
        if getattr(s, key) < 1:
            raise ConfigError(f"invalid value for {key}: {getattr(s, key)!r}; expected an integer >= 1.")
    for key in ("max_new_tokens", "max_length", "max_samples"):
        value = getattr(s, key)
        if value is not None and value < 1:
            raise ConfigError(f"invalid value for {key}: {value!r}; expected an integer >= 1.")
    if s.temperature is not None and s.temperature < 0:
        raise ConfigError(f"invalid value for temperature: {s.temperature!r}; expected a number >= 0.")
    if s.top_p is not None and not 0 < s.top_p <= 1:
        raise ConfigError(f"invalid value for top_p: {s.top_p!r}; expected a number in (0, 1].")
    if s.top_k is not None and s.top_k < 0:
        raise ConfigError(f"invalid value for top_k: {s.top_k!r}; expected an integer >= 0 (0 disables top-k).")
    if s.repetition_penalty is not None and s.repetition_penalty <= 0:
        raise ConfigError(f"invalid value for repetition_penalty: {s.repetition_penalty!r}; expected a number > 0.")
    if not 0 < s.api_port < 65536:
        raise ConfigError(f"invalid value for api_port: {s.api_port!r}; expected a port number from 1 to 65535.")
    if s.num_beams > 1:
        raise ConfigError(
            f"invalid value for num_beams: {s.num_beams!r}; Stoker decodes one beam (greedy or sampling). "
            "Remove num_beams or set it to 1."
        )
    if s.length_penalty != 1.0:
        # transformers applies it to beam scores only, and Stoker decodes one beam: say so rather than ignore it quietly.
        logger.warning("length_penalty=%r has no effect: it only scales beam-search scores, and Stoker decodes one "
                       "beam. Remove it.", s.length_penalty)
    if s.adapter_name_or_path and s.finetuning_type != "lora":
        raise ConfigError(
            f"adapter_name_or_path is set but finetuning_type is {s.finetuning_type!r}; adapters need "
            "finetuning_type: lora (for full or freeze fine-tuning, point model_name_or_path at the trained model)."
        )


# Generation keys and the greedy values used when neither the YAML nor generation_config.json sets them.
GREEDY_DEFAULTS: dict[str, Any] = {
    "do_sample": False,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "repetition_penalty": 1.0,
    "max_new_tokens": 512,
}


def generation_defaults(settings: Settings, model_generation_config: dict[str, Any] | None) -> dict[str, Any]:
    """Resolve the generation keys: the YAML wins, then the model's generation_config.json, then greedy.

    LLaMA-Factory samples at temperature 0.95 / top_p 0.7 (top_k 50) unless told otherwise, so its results vary run to run;
    Stoker is greedy unless the config or the model's own generation_config asks for sampling.
    """
    gen = model_generation_config or {}
    out: dict[str, Any] = {}
    for key, fallback in GREEDY_DEFAULTS.items():
        value = getattr(settings, key)
        if value is None:
            value = gen.get(key)
        out[key] = fallback if value is None else value
    return out
