"""Assemble what every surface needs from a Settings object: model, engine, template and chat service."""

from __future__ import annotations

import logging
from pathlib import Path

from stoker.chat import ChatService
from stoker.config import Settings, generation_defaults
from stoker.errors import ConfigError

logger = logging.getLogger("stoker")


def served_model_name(settings: Settings) -> str:
    if settings.api_model_name:
        return settings.api_model_name
    return Path(str(settings.model_name_or_path).rstrip("/")).name or "model"


def open_chat_service(settings: Settings, *, per_request_adapters: bool = False) -> ChatService:
    """Load the model and start its engine.

    ``per_request_adapters``: keep LoRA adapters separate so each request can pick one (the API); otherwise the
    config's adapters are merged into the weights in order, as LLaMA-Factory applies them (chat, webchat, predict),
    unless ``merge_adapters: false`` keeps the one adapter apart (the same numbers as the API's, at some speed).
    """
    from stoker.templates import check_template_mismatch, get_template

    if settings.backend == "vllm":
        from stoker.engines.vllm import open_vllm_engine

        engine, tokenizer, generation_config, processor = open_vllm_engine(
            settings, per_request_adapters=per_request_adapters
        )
    else:
        from stoker.engines.hf import HFEngine
        from stoker.models.loader import load_model

        merge = settings.merge_adapters and not per_request_adapters
        loaded = load_model(settings, merge=merge)
        default_adapter = None
        if loaded.adapters and not merge and not per_request_adapters:
            if len(loaded.adapters) > 1:
                raise ConfigError(
                    f"merge_adapters: false keeps an adapter apart from the weights, but adapter_name_or_path lists "
                    f"{len(loaded.adapters)}; stacking several in order needs merging. Set merge_adapters: true, or "
                    "keep one adapter."
                )
            default_adapter = next(iter(loaded.adapters))
        engine = HFEngine(
            loaded.model,
            loaded.tokenizer,
            max_num_seqs=settings.max_num_seqs,
            max_batch_tokens=settings.max_batch_tokens,
            max_queue=settings.max_queue,
            adapters=list(loaded.adapters) if not loaded.merged else None,
            default_adapter=default_adapter,
            cpu_matmul=settings.cpu_matmul,
        )
        tokenizer, generation_config, processor = loaded.tokenizer, loaded.generation_config, loaded.processor

    template = get_template(settings.template, tokenizer)
    if settings.template not in (None, "auto"):
        warning = check_template_mismatch(template, tokenizer)
        if warning:
            logger.warning(warning)
    eos = generation_config.get("eos_token_id")
    extra_stop_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return ChatService(
        engine=engine,
        tokenizer=tokenizer,
        template=template,
        settings=settings,
        generation=generation_defaults(settings, generation_config),
        model_name=served_model_name(settings),
        processor=processor,
        extra_stop_ids=extra_stop_ids,
    )
