"""The one way to open an engine: settings in, a running engine of either backend plus what the chat service needs.

Both backends share the rules here: which of the config's adapters are merged, applied by default or selectable
per request, and which token ids end a reply. Everything the surfaces need to know afterwards is in ``engine.info``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoker.config import Settings
from stoker.engines.base import Engine
from stoker.models.loader import STACKED_ADAPTER
from stoker.errors import ConfigError

logger = logging.getLogger("stoker")


@dataclass
class OpenedEngine:
    engine: Engine
    tokenizer: Any
    processor: Any  # vision models only; the chat service renders image prompts with it
    generation_config: dict[str, Any]  # the model's generation_config.json, raw (sampling defaults come from it)
    adapters: list[str]  # the config's adapters in the order they apply, by id (see models.loader.adapter_paths)


@dataclass(frozen=True)
class AdapterPlan:
    """What becomes of the config's adapters: folded into the weights, applied to every request, or chosen by each."""

    merge: bool  # fold them into the weights in order (huggingface only)
    default: str | None  # the adapter applied to requests that name none (the configured model), or None
    per_request: bool  # each request may pick any adapter, or the base weights
    stack: bool = False  # serve the adapters, applied in order, as one more adapter (STACKED_ADAPTER)


def plan_adapters(settings: Settings, adapters: dict[str, Path], *, per_request: bool,
                  quantized: bool = False) -> AdapterPlan:
    """The rule both backends follow. The configured model is the base with every adapter applied in order:

    - for fixed weights (chat, web chat, predict) the huggingface backend merges them; without merging (always on
      vLLM, which applies one LoRA per request) only one adapter can be fixed;
    - for per-request choice (the API) the configured model is the default: the one adapter, or on the huggingface
      backend the adapters summed into one (a LoRA delta does not depend on the weights it is added to, so the sum
      is what merging them in order gives); vLLM cannot serve several as one;
    - a quantized model takes no merge, so it takes one adapter, kept apart (as in LLaMA-Factory).
    """
    vllm = settings.backend == "vllm"
    if per_request:
        if len(adapters) <= 1:
            return AdapterPlan(merge=False, default=next(iter(adapters), None), per_request=True)
        if vllm:
            raise ConfigError(
                f"infer_backend: vllm applies one LoRA adapter per request, so it cannot serve the configured model, "
                f"which applies {len(adapters)} adapters in order ({', '.join(adapters)}). Merge them into the model "
                "first (e.g. llamafactory-cli export), keep one, or use infer_backend: huggingface, which stacks them."
            )
        return AdapterPlan(merge=False, default=STACKED_ADAPTER, per_request=True, stack=True)
    merge = bool(adapters) and not vllm and not quantized and settings.merge_adapters
    if not adapters or merge:
        return AdapterPlan(merge=merge, default=None, per_request=False)
    if len(adapters) > 1:
        if quantized:
            raise ConfigError(
                f"a quantized model cannot have adapters merged into it, and adapter_name_or_path lists "
                f"{len(adapters)}; merge them into the model before quantizing, or keep one adapter.")
        if vllm:
            raise ConfigError(
                f"infer_backend: vllm applies one LoRA adapter per request, but adapter_name_or_path lists "
                f"{len(adapters)} ({', '.join(adapters)}). Merge them into the model first (e.g. llamafactory-cli "
                "export), keep one, or use infer_backend: huggingface, which stacks them."
            )
        raise ConfigError(
            f"merge_adapters: false keeps an adapter apart from the weights, but adapter_name_or_path lists "
            f"{len(adapters)}; stacking several in order needs merging. Set merge_adapters: true, or keep one adapter."
        )
    return AdapterPlan(merge=False, default=next(iter(adapters)), per_request=False)


def check_backend_takes(settings: Settings, gguf: str | None) -> None:
    """What a backend cannot load at all is refused before it starts."""
    if gguf and settings.backend == "vllm":
        raise ConfigError(
            f"infer_backend: vllm cannot load the GGUF file {gguf}: vLLM 0.32 has no GGUF loader. Use "
            "infer_backend: huggingface, which dequantizes it, or the model's Hugging Face folder.",
            param="infer_backend")
    if settings.backend == "vllm" and settings.cpu_matmul in ("int8", "int4"):
        raise ConfigError(
            f"cpu_matmul: {settings.cpu_matmul} quantizes the huggingface engine's CPU linear layers; vLLM runs its "
            "own kernels. Use infer_backend: huggingface, or remove cpu_matmul.", param="cpu_matmul")


def open_engine(settings: Settings, *, per_request_adapters: bool = False) -> OpenedEngine:
    """Load the model and start its engine on the configured backend.

    ``per_request_adapters``: keep LoRA adapters separate so each request can pick one (the API); otherwise the
    config's adapters apply to every request (chat, web chat, predict), merged into the weights where the backend can.
    """
    from stoker.models.loader import adapter_paths, gguf_of, resolve_model_path

    from stoker.models.facts import read_model_facts

    path = resolve_model_path(settings.model_name_or_path, settings=settings)
    adapters = adapter_paths(settings)
    gguf = gguf_of(settings, path)
    check_backend_takes(settings, gguf)
    facts = read_model_facts(path, gguf)
    quantized = settings.quantization_bit is not None or facts.quant_method is not None
    plan = plan_adapters(settings, adapters, per_request=per_request_adapters, quantized=quantized)
    if settings.backend == "vllm":
        return _open_vllm(settings, path, adapters, plan)
    return _open_huggingface(settings, path, adapters, plan)


def _open_huggingface(settings: Settings, path: Path, adapters: dict[str, Path], plan: AdapterPlan) -> OpenedEngine:
    from stoker.engines.hf import HFEngine
    from stoker.models.facts import eos_token_ids, read_model_facts
    from stoker.models.loader import gguf_of, load_model

    if settings.torch_threads:
        import torch

        # Process-wide, and before loading: weight conversion and packing run on these threads too.
        torch.set_num_threads(settings.torch_threads)
    loaded = load_model(settings, path=path, adapters=adapters, merge=plan.merge, stack=plan.stack)
    selectable = [*adapters, *([STACKED_ADAPTER] if plan.stack else [])]
    engine = HFEngine(
        loaded.model,
        loaded.tokenizer,
        max_num_seqs=settings.max_num_seqs,
        max_batch_tokens=settings.max_batch_tokens,
        max_queue=settings.max_queue,
        adapters=selectable if adapters and not plan.merge else None,
        default_adapter=plan.default,
        eos_ids=eos_token_ids(loaded.generation_config, read_model_facts(path, gguf_of(settings, path)).eos_token_ids,
                              loaded.tokenizer),
        cpu_matmul=settings.cpu_matmul,
        prefix_cache_tokens=settings.prefix_cache_tokens,
    )
    if plan.merge:
        engine.info.merged_adapters = list(adapters)
    return OpenedEngine(engine, loaded.tokenizer, loaded.processor, loaded.generation_config, list(adapters))


def _open_vllm(settings: Settings, path: Path, adapters: dict[str, Path], plan: AdapterPlan) -> OpenedEngine:
    from stoker.engines.vllm import VLLMEngine, import_vllm, prepare_environment
    from stoker.engines.vllm_args import engine_kwargs
    from stoker.models.facts import eos_token_ids, read_generation_config, read_model_facts
    from stoker.models.loader import gguf_of, load_tokenizer
    from stoker.models.vision import check_visual_inputs, check_vllm_vision, load_processor

    facts = read_model_facts(path, gguf_of(settings, path))
    check_visual_inputs(settings, vision=facts.vision)
    check_vllm_vision(facts.model_type if facts.vision else None, path)
    tokenizer = load_tokenizer(settings, path)
    generation_config = read_generation_config(path)

    import_vllm()
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    gpu_count = 0 if cpu else visible_gpus()
    kwargs = engine_kwargs(settings, path, facts, adapters, cpu=cpu, gpu_count=gpu_count,
                           gguf=gguf_of(settings, path))
    prepare_environment(cpu=cpu)
    # The chat service renders image prompts with the processor; vLLM runs its own copy on the images.
    processor = load_processor(path, settings) if facts.vision else None
    mode = "in-process" if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" else "engine-core process"
    logger.info("starting vLLM on %s (%s, %s, max_model_len %s)", path, "CPU" if cpu else f"{gpu_count} GPU(s)", mode,
                kwargs.get("max_model_len"))
    engine = VLLMEngine(
        kwargs,
        tokenizer,
        adapters=adapters,
        default_adapter=plan.default,
        per_request=plan.per_request,
        eos_ids=eos_token_ids(generation_config, facts.eos_token_ids, tokenizer),
        max_queue=settings.max_queue,
        max_batch_tokens=settings.max_batch_tokens,
        vision=facts.vision,
    )
    return OpenedEngine(engine, tokenizer, processor, generation_config, list(adapters))


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
