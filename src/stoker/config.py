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
    gguf_file: str | None = None  # a GGUF file in the model folder (also: model_name_or_path: path/to/file.gguf)
    adapter_name_or_path: list[str] = field(default_factory=list)  # comma list in YAML; applied in order
    adapter_folder: str | None = None  # LLaMA-Factory's: the sub-folder of each adapter path with the adapter files
    finetuning_type: Literal["lora", "oft", "full", "freeze"] = "lora"
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
    # --- loading: LLaMA-Factory's model arguments that change inference (docs/config.md says what each does) -------
    quantization_bit: int | None = None  # on-the-fly quantization: 4 or 8 (bnb), 1-8 (hqq), 8 (eetq)
    quantization_method: str = "bnb"
    quantization_type: Literal["fp4", "nf4"] = "nf4"
    double_quantization: bool = True
    quantization_device_map: Literal["auto"] | None = None
    rope_scaling: Literal["linear", "dynamic", "yarn", "llama3"] | None = None
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2", "fa3"] = "auto"
    use_kv_cache: bool = True
    low_cpu_mem_usage: bool = True  # false: the model stays on the CPU, as in LLaMA-Factory
    offload_folder: str | None = None  # refused when set: Stoker keeps the whole model on one device
    print_param_status: bool = False
    split_special_tokens: bool = False
    add_tokens: list[str] = field(default_factory=list)
    add_special_tokens: list[str] = field(default_factory=list)
    resize_vocab: bool = False
    train_from_scratch: bool = False  # refused when true: random weights
    mixture_of_depths: str | None = None  # refused when set
    use_unsloth: bool = False  # refused when true
    # Set by predict to cutoff_len, as LLaMA-Factory's train path does; it sizes the RoPE scaling factor.
    model_max_length: int | None = None
    # --- prompt ------------------------------------------------------------------------------------------------
    default_system: str | None = None
    enable_thinking: bool | None = True
    preserve_thinking: bool = False  # keep the reasoning of earlier assistant turns in the prompt
    tool_format: str | None = None  # a tool format other than the template's (default, qwen, llama3, mistral, ...)
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
    # Every reply decoded under a constraint (chat, web chat, predict; the API's default): a JSON schema (inline, as
    # JSON text, or a .json file's path), or OpenAI's response_format ("json_object", or its json_schema mapping).
    json_schema: dict[str, Any] | str | None = None
    response_format: dict[str, Any] | str | None = None
    # --- engine ------------------------------------------------------------------------------------------------
    max_num_seqs: int = 64  # requests batched together
    max_batch_tokens: int = 65536  # prompt + new tokens of all running requests
    max_queue: int = 256  # waiting requests beyond this get HTTP 429
    # Faster float32 linears on CPU (engines.cpu_linear); int8 / int4: weight-only quantized decode steps, opt-in
    cpu_matmul: Literal["auto", "packed", "stock", "int8", "int4"] = "auto"
    prefix_cache_tokens: int = 4096  # prompt-prefix tokens whose KV the huggingface engine keeps (0: off)
    torch_threads: int = 0  # torch's CPU threads for the huggingface backend; 0: OMP_NUM_THREADS, else the physical cores
    # --- vLLM ----------------------------------------------------------------------------------------------------
    vllm_maxlen: int = 4096
    vllm_gpu_util: float = 0.7  # LLaMA-Factory's default
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
    image_fetch_timeout: float = 10.0  # seconds for a whole image URL fetch, redirects included
    media_dir: str | None = None
    allow_private_urls: bool = False
    image_do_pan_and_scan: bool = False  # Gemma 3's pan and scan
    crop_to_patches: bool = False  # InternVL's crops
    video_max_bytes: int = 100 * 1024 * 1024
    video_max_pixels: int = 256 * 256
    video_min_pixels: int = 16 * 16
    video_fps: float = 2.0
    video_maxlen: int = 128
    audio_sampling_rate: int = 16000
    use_audio_in_video: bool = False
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
    # Predict with each of these models side by side, in one batch: "base" (no adapter) and adapter ids; one
    # sub-folder of output_dir each, and a table of their metrics.
    compare: list[str] = field(default_factory=list)
    # Training arguments a predict run reads: the compute dtype, and which rows are predicted.
    bf16: bool = False
    fp16: bool = False
    pure_bf16: bool = False
    tf32: bool | None = None
    val_size: float = 0.0
    tokenized_path: str | None = None
    mix_strategy: str = "concat"
    interleave_probs: str | None = None
    # --- API server ------------------------------------------------------------------------------------------------
    api_host: str = "0.0.0.0"
    api_port: int = 8000
    api_key: str | None = None
    api_model_name: str | None = None
    api_max_body_mb: int = 64  # request bodies above this many MiB get HTTP 413
    api_strict_model: bool = False  # an unknown model id is a 404 (default: the configured model answers)
    # --- web chat ----------------------------------------------------------------------------------------------------
    gradio_server_name: str = "127.0.0.1"
    gradio_server_port: int = 7860
    gradio_share: bool = False

    # Where the settings came from, for messages and for resolving relative paths.
    source: str | None = field(default=None, repr=False)
    # Where each key given came from: "file", "command line" or "environment" (``stoker check`` prints them).
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

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
    num_train_epochs max_steps lr_scheduler_type warmup_ratio warmup_steps weight_decay
    logging_steps save_steps save_strategy save_total_limit save_only_model plot_loss gradient_accumulation_steps
    per_device_train_batch_size gradient_checkpointing lora_rank lora_alpha lora_dropout lora_target additional_target
    use_dora use_rslora pissa_init loraplus_lr_ratio freeze_trainable_layers freeze_trainable_modules
    eval_strategy evaluation_strategy eval_steps resume_from_checkpoint report_to run_name shift_attn
    upcast_layernorm upcast_lmhead_output neftune_noise_alpha packing use_unsloth_gc use_reentrant_gc
    neat_packing train_on_prompt mask_history streaming buffer_size
    include_num_input_tokens_seen ddp_find_unused_parameters optim max_grad_norm adam_beta1 adam_beta2
    disable_gradient_checkpointing enable_liger_kernel pref_beta pref_loss dpo_label_smoothing
    ref_model reward_model logging_dir load_best_model_at_end metric_for_best_model greater_is_better
    compute_accuracy moe_aux_loss_coef use_v1_kernels freeze_vision_tower freeze_multi_modal_projector
    freeze_language_model create_new_adapter init_special_tokens new_special_tokens_config seed_data
    export_dir export_size export_device export_quantization_bit export_quantization_dataset
    export_quantization_nsamples export_quantization_maxlen export_legacy_format export_hub_model_id
    sglang_maxlen sglang_mem_fraction sglang_tp_size sglang_lora_backend sglang_config
    """.split()
)

# Keys LLaMA-Factory reads that Stoker cannot honour: set, they stop the run with the reason and what to do.
REFUSED_KEYS = {
    "ms_hub_token": "Stoker loads models from local folders and the Hugging Face hub only (not ModelScope); "
                    "download the model and point model_name_or_path at its folder.",
    "om_hub_token": "Stoker loads models from local folders and the Hugging Face hub only (not OpenMind); "
                    "download the model and point model_name_or_path at its folder.",
    "use_kt": "KTransformers is not a Stoker backend; use infer_backend: huggingface or vllm.",
    "kt_config": "KTransformers is not a Stoker backend; use infer_backend: huggingface or vllm.",
}

# Values LLaMA-Factory accepts that Stoker does not, with the reason and what to use instead.
REFUSED_VALUES = {
    ("infer_backend", "sglang"): "sglang is not a Stoker backend. Use infer_backend: vllm for vLLM's kernels and "
                                 "batching, or huggingface (the default).",
    ("infer_backend", "ktransformers"): "KTransformers is not a Stoker backend; use infer_backend: huggingface or "
                                        "vllm.",
}

# Keys under other names in LLaMA-Factory or transformers, mapped onto ours.
ALIASES = {"model_name": "api_model_name", "vllm_max_lora_rank": "vllm_max_lora_rank", "overwrite": "overwrite_output_dir",
           # LLaMA-Factory's older names (use_cache until 0.9.3, new_special_tokens until 0.9.2).
           "use_cache": "use_kv_cache", "new_special_tokens": "add_special_tokens"}

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

_FIELDS = {f.name: f for f in dataclasses.fields(Settings) if f.name not in ("source", "origins")}
_HINTS = typing.get_type_hints(Settings)
_LIST_KEYS = {"adapter_name_or_path", "dataset", "eval_dataset", "add_tokens", "add_special_tokens", "compare"}


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
    origins: dict[str, str] = {}
    source = None
    if path is not None:
        raw = read_yaml(Path(path))
        origins = dict.fromkeys(raw, "file")
        source = str(path)
    raw.update(overrides or {})
    origins.update(dict.fromkeys(overrides or {}, "command line"))
    env = dict(os.environ) if env is None else env
    for key, var in ENV_KEYS.items():
        if key not in raw and key.upper() not in raw and var in env:
            raw[key] = _yaml_value(env[var])
            origins[key] = f"environment ({var})"
    return settings_from_dict(raw, source=source, origins=origins)


def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        from stoker.paths import shown

        raise ConfigError(f"config file not found: {shown(path)}. Pass the path of a YAML file, e.g. "
                          "examples/inference/demo.yaml.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}.") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path} is not UTF-8 text: byte {exc.start} (line {line}) is 0x{raw[exc.start]:02x}. "
                          "Save the file as UTF-8 (most editors offer it under 'Save with encoding').") from None
    try:
        data = yaml.safe_load(text)
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


def settings_from_dict(raw: dict[str, Any], *, source: str | None = None,
                       origins: dict[str, str] | None = None) -> Settings:
    values: dict[str, Any] = {}
    named: dict[str, str] = {}
    where = f" in {source}" if source else ""
    for key, value in raw.items():
        name = str(key)
        lowered = name.lower()
        if lowered in _FIELDS and name not in _FIELDS:
            name = lowered  # API_HOST, API_PORT ... written in the YAML as the env var names
        name = ALIASES.get(name, name)
        if name in _FIELDS:
            refused = REFUSED_VALUES.get((name, value)) if isinstance(value, str) else None
            if refused:
                raise ConfigError(f"{name}: {refused}", param=name)
            values[name] = coerce(name, value)
            named[name] = (origins or {}).get(key, "file" if source else "command line")
        elif name in TRAINING_ONLY_KEYS:
            logger.debug("ignoring training-only key %s%s", name, where)
        elif name in REFUSED_KEYS:
            if value not in (None, False, "", [], {}):
                raise ConfigError(f"{name} is set{where}, but {REFUSED_KEYS[name]}", param=name)
        else:
            close = difflib.get_close_matches(name, list(_FIELDS) + sorted(TRAINING_ONLY_KEYS), n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            logger.warning("unknown config key %r%s ignored%s", name, where, hint)
    settings = Settings(**values, source=source, origins=named)
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
    if s.prefix_cache_tokens < 0:
        raise ConfigError(f"invalid value for prefix_cache_tokens: {s.prefix_cache_tokens!r}; expected a number of "
                          "tokens >= 0 (0 turns the prefix cache off).")
    if s.torch_threads < 0:
        raise ConfigError(f"invalid value for torch_threads: {s.torch_threads!r}; expected a number of CPU threads "
                          ">= 1, or 0 for the default (OMP_NUM_THREADS if set, else one per physical core).")
    for key in ("max_new_tokens", "max_length", "max_samples"):
        value = getattr(s, key)
        if value is not None and value < 1:
            raise ConfigError(f"invalid value for {key}: {value!r}; expected an integer >= 1.")
    if not s.image_fetch_timeout > 0:
        raise ConfigError(f"invalid value for image_fetch_timeout: {s.image_fetch_timeout!r}; expected seconds > 0.")
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
    _check_inference_keys(s)
    if s.json_schema is not None and s.response_format not in (None, "text"):
        raise ConfigError("json_schema and response_format are both set: keep one (json_schema: SCHEMA is "
                          "response_format: {type: json_schema, json_schema: {schema: SCHEMA}}).", param="json_schema")
    if s.adapter_name_or_path and s.finetuning_type != "lora":
        raise ConfigError(
            f"adapter_name_or_path is set but finetuning_type is {s.finetuning_type!r}; adapters need "
            "finetuning_type: lora (for full or freeze fine-tuning, point model_name_or_path at the trained model)."
        )


QUANTIZATION_METHODS = ("bnb", "hqq", "eetq")  # on the fly; LLaMA-Factory's others name pre-quantized checkpoints
PREQUANTIZED_METHODS = ("gptq", "awq", "aqlm", "quanto", "mxfp4", "fp8")


def _check_inference_keys(s: Settings) -> None:
    """LLaMA-Factory's keys that change inference: a value Stoker cannot honour stops here, before anything loads,
    with the reason and what to do (docs/config.md lists every key's status)."""
    def refuse(key: str, why: str) -> None:
        raise ConfigError(f"{key}: {why}", param=key)

    if s.stage != "sft":
        refuse("stage", f"{s.stage!r} models score rather than generate (LLaMA-Factory serves them for "
                        "/v1/score/evaluation), and Stoker only generates. Use stage: sft, or remove the key.")
    if s.quantization_method == "bitsandbytes":  # LLaMA-Factory up to 0.9.2
        s.quantization_method = "bnb"
    known = (*QUANTIZATION_METHODS, *PREQUANTIZED_METHODS)
    if s.quantization_method not in known:
        refuse("quantization_method", f"{s.quantization_method!r} is not a method LLaMA-Factory knows; expected one "
                                      f"of {', '.join(known)}.")
    if s.quantization_bit is not None:
        if s.quantization_method in PREQUANTIZED_METHODS:
            refuse("quantization_method", f"{s.quantization_method} names checkpoints quantized ahead of time (their "
                                          "config.json says so, and they load as they are); quantization_bit "
                                          "quantizes on the fly with bnb, hqq or eetq. Remove quantization_bit, or "
                                          "set quantization_method: bnb.")
        allowed = {"bnb": (4, 8), "hqq": (1, 2, 3, 4, 5, 6, 8), "eetq": (8,)}[s.quantization_method]
        if s.quantization_bit not in allowed:
            refuse("quantization_bit", f"{s.quantization_bit} bits is not what {s.quantization_method} quantizes to; "
                                       f"expected {' or '.join(map(str, allowed))}.")
        if s.finetuning_type not in ("lora", "oft"):
            refuse("quantization_bit", "quantization is only compatible with the LoRA or OFT method (as in "
                                       "LLaMA-Factory): a full or freeze fine-tune loads at its own precision.")
        if s.resize_vocab:
            refuse("resize_vocab", "a quantized model cannot have its vocabulary resized; drop one of the two.")
        if s.backend == "vllm":
            refuse("quantization_bit", "vLLM does not quantize on the fly with bitsandbytes here; it loads "
                                       "pre-quantized checkpoints (GPTQ, AWQ, FP8) as they are, or set "
                                       "vllm_config: {quantization: ...}. Use infer_backend: huggingface for "
                                       "quantization_bit.")
    if s.flash_attn != "auto" and s.backend == "vllm":
        refuse("flash_attn", "vLLM picks its own attention kernels; remove flash_attn, or choose one with "
                             "vllm_config: {attention_backend: ...}.")
    if not s.use_kv_cache:
        refuse("use_kv_cache", "Stoker's engines always keep a KV cache: without one, continuous batching would "
                               "recompute every prompt at every step. Outputs are the same with it; remove the key.")
    if s.offload_folder:
        refuse("offload_folder", "Stoker keeps the whole model on one device and never offloads layers to disk. "
                                 "Remove offload_folder; for a model too big for the device, use quantization_bit.")
    if s.train_from_scratch:
        refuse("train_from_scratch", "it gives the model random weights, which is for training; remove it.")
    if s.mixture_of_depths:
        refuse("mixture_of_depths", "Mixture-of-Depths models are not supported; remove the key.")
    if s.use_unsloth:
        refuse("use_unsloth", "Stoker does not load models through unsloth (its own engines batch instead); "
                              "remove the key: the adapter loads as a plain LoRA adapter.")
    for kind in ("image", "video"):
        low, high = getattr(s, f"{kind}_min_pixels"), getattr(s, f"{kind}_max_pixels")
        if low > high:
            refuse(f"{kind}_max_pixels", f"{kind}_max_pixels ({high}) is below {kind}_min_pixels ({low}).")
    if s.val_size > 0 and not s.eval_dataset:
        refuse("val_size", "predicting on a split of the training dataset is not supported; name the rows to "
                           "predict with eval_dataset.")
    if s.tokenized_path:
        refuse("tokenized_path", "Stoker renders the prompts itself and does not read pre-tokenized datasets; remove "
                                 "tokenized_path and name the datasets with eval_dataset.")
    if s.mix_strategy != "concat" or s.interleave_probs:
        refuse("mix_strategy", "only concat is supported: predict goes through every row of every eval_dataset in "
                               "order. Remove mix_strategy and interleave_probs.")


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
