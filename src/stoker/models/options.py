"""LLaMA-Factory's loading keys, applied as it applies them: quantization, RoPE scaling, attention, added tokens.

Each function turns settings (and what the model folder says) into what ``from_pretrained`` takes, or stops with a
``ConfigError`` that names the key and what to do; none of them loads anything itself.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from typing import Any

from stoker.config import Settings
from stoker.errors import ConfigError

logger = logging.getLogger("stoker")

# What a pre-quantized checkpoint (``quantization_config.quant_method`` in config.json) needs to load.
PREQUANTIZED_PACKAGES = {"gptq": "gptqmodel", "awq": "autoawq", "aqlm": "aqlm", "bitsandbytes": "bitsandbytes",
                         "hqq": "hqq", "eetq": "eetq", "quanto": "optimum-quanto"}
# Packages that only run on CUDA GPUs.
CUDA_ONLY = {"eetq", "autoawq", "aqlm"}
ATTENTION = {"disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2", "fa3": "flash_attention_3"}


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package.replace("-", "_").replace("optimum_quanto", "optimum.quanto")) is not None


# --------------------------------------------------------------------------------------------------------------------
# Quantization
def quantization_config(settings: Settings, config: Any, device: str) -> Any:
    """What ``from_pretrained(quantization_config=...)`` takes for ``quantization_bit``, or for a pre-quantized
    checkpoint that must be dequantized to load here; None when the weights load as they are."""
    existing = getattr(config, "quantization_config", None)
    if existing is not None:
        method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", None)
        method = str(getattr(method, "value", method) or "")
        if settings.quantization_bit is not None:
            logger.warning("quantization_bit has no effect on a model quantized ahead of time (%s)", method)
        return _prequantized(method, device)
    bits = settings.quantization_bit
    if bits is None:
        return None

    method = settings.quantization_method
    if method == "bnb":
        _require("bitsandbytes", "quantization_method: bnb", device, extra="stoker[quant]")
        from transformers import BitsAndBytesConfig

        if bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        compute = pick_dtype(settings, device)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute,
                                  bnb_4bit_use_double_quant=settings.double_quantization,
                                  bnb_4bit_quant_type=settings.quantization_type, bnb_4bit_quant_storage=compute)
    if method == "hqq":
        _require("hqq", "quantization_method: hqq", device)
        from transformers import HqqConfig

        return HqqConfig(nbits=bits, quant_zero=False, quant_scale=False, axis=0)
    _require("eetq", "quantization_method: eetq", device)
    from transformers import EetqConfig

    return EetqConfig()


def _prequantized(method: str, device: str) -> Any:
    if method in ("fp8", "mxfp4"):
        # As LLaMA-Factory does: the weights are dequantized as they load (no FP8/MXFP4 kernels needed).
        from transformers import FineGrainedFP8Config, Mxfp4Config

        return FineGrainedFP8Config(dequantize=True) if method == "fp8" else Mxfp4Config(dequantize=True)
    package = PREQUANTIZED_PACKAGES.get(method)
    if package is not None:
        _require(package, f"this {method.upper()}-quantized checkpoint", device)
    return None  # transformers reads the checkpoint's own quantization_config


def _require(package: str, what: str, device: str, *, extra: str | None = None) -> None:
    if package in CUDA_ONLY and device != "cuda":
        raise ConfigError(f"{what} needs {package}, which runs on CUDA GPUs only, and this model loads on {device}. "
                          "Use a CUDA machine, or quantization_method: bnb (which also runs on CPUs).")
    if not _installed(package):
        how = f"pip install {extra or package}"
        raise ConfigError(f"{what} needs the {package} package, which is not installed: {how}.")


# --------------------------------------------------------------------------------------------------------------------
# RoPE scaling
def rope_scaling(settings: Settings, original_max: int | None) -> tuple[dict[str, Any], int] | None:
    """LLaMA-Factory's RoPE scaling: (the rope parameters to set, the new context length), or None.

    The factor is 2.0 for chat, web chat and the API; predict (where ``model_max_length`` is ``cutoff_len``) takes
    ``ceil(cutoff_len / original length)``, and no scaling at all when the prompts already fit.
    """
    kind = settings.rope_scaling
    if kind is None:
        return None
    if original_max is None:
        logger.warning("rope_scaling: the model's config names no context length to scale; left as it is")
        return None
    wanted = settings.model_max_length
    if wanted is not None:
        if wanted <= original_max:
            logger.warning("rope_scaling: cutoff_len %d fits the model's context of %d; rope scaling is off",
                           wanted, original_max)
            return None
        factor = float(math.ceil(wanted / original_max))
    else:
        factor = 2.0
    params: dict[str, Any] = {"rope_type": kind, "factor": factor}
    if kind in ("dynamic", "yarn", "llama3"):
        params["original_max_position_embeddings"] = original_max
    if kind == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return params, int(original_max * factor)


def scale_rope(settings: Settings, config: Any) -> None:
    """Apply ``rope_scaling`` to a transformers config (its text config for a vision-language model)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    current = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
    original = current.get("original_max_position_embeddings") or getattr(text, "max_position_embeddings", None)
    scaled = rope_scaling(settings, original)
    if scaled is None:
        return
    params, context = scaled
    merged = {k: v for k, v in current.items() if k not in ("rope_type", "type", "factor")} | params
    if hasattr(text, "rope_parameters"):
        text.rope_parameters = merged
    else:
        text.rope_scaling = merged
    text.max_position_embeddings = context
    logger.info("rope_scaling %s, factor %g: context %d -> %d", params["rope_type"], params["factor"], original,
                context)


# --------------------------------------------------------------------------------------------------------------------
# Attention and tokens
def attention_implementation(settings: Settings, device: str) -> str | None:
    """``attn_implementation`` for ``flash_attn`` (None for auto: transformers' default)."""
    if settings.flash_attn == "auto":
        return None
    name = ATTENTION[settings.flash_attn]
    if settings.flash_attn in ("fa2", "fa3"):
        from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

        available = is_flash_attn_2_available() if settings.flash_attn == "fa2" else is_flash_attn_3_available()
        if device != "cuda" or not available:
            package = "flash-attn" if settings.flash_attn == "fa2" else "flash-attn 3 (flash_attn_interface)"
            raise ConfigError(f"flash_attn: {settings.flash_attn} needs {package} on a CUDA GPU, which this machine "
                              f"lacks (the model loads on {device}). Use flash_attn: sdpa, or auto.",
                              param="flash_attn")
    return name


def check_added_tokens(settings: Settings, tokenizer: Any) -> None:
    """``add_tokens`` / ``add_special_tokens``: a fine-tuned model's tokenizer has them already, which is what
    LLaMA-Factory's inference then sees. One it lacks would get a freshly initialised embedding the model never
    trained, so that is refused."""
    wanted = [*settings.add_tokens, *settings.add_special_tokens]
    if not wanted:
        return
    vocab = tokenizer.get_vocab()
    missing = [t for t in wanted if t not in vocab]
    if missing:
        raise ConfigError(
            f"add_tokens / add_special_tokens name {missing}, which the tokenizer of {settings.model_name_or_path!r} "
            "does not have: their embeddings would be untrained. Point model_name_or_path at the fine-tuned model "
            "(whose tokenizer has them), or remove them.", param="add_special_tokens")


def log_param_status(model: Any) -> None:
    """``print_param_status``: every parameter's name, dtype and device, as LLaMA-Factory prints them."""
    for name, param in model.named_parameters():
        logger.info("name: %s, dtype: %s, device: %s, trainable: %s", name, param.dtype, param.device,
                    param.requires_grad)


def pick_dtype(settings: Settings, device: str) -> Any:
    import torch

    if settings.infer_dtype != "auto":
        return getattr(torch, settings.infer_dtype)
    # A predict YAML's training flags set the compute dtype, as in LLaMA-Factory's train path.
    if settings.bf16 or settings.pure_bf16:
        return torch.bfloat16
    if settings.fp16:
        return torch.float16
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32  # half precision on CPU is slow and inexact
