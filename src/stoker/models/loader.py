"""Load tokenizer, model and LoRA adapters from a local folder or a Hugging Face hub id.

Hub ids resolve from the local cache first; a download is tried only when the hub is reachable and not disabled
(``HF_HUB_OFFLINE=1``). Either way a failure says plainly what was looked for and where.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stoker.config import Settings
from stoker.errors import ConfigError, ModelLoadError
from stoker.models.facts import read_generation_config
from stoker.paths import shown

logger = logging.getLogger("stoker")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    path: Path  # local folder of the base model
    generation_config: dict[str, Any] = field(default_factory=dict)  # the model's generation_config.json, raw
    adapters: dict[str, Path] = field(default_factory=dict)  # name -> folder, in the order applied
    merged: bool = False  # adapters merged into the weights (then none is selectable per request)
    processor: Any = None  # vision models only


DEMO_PREFIX = "demo:"  # demo:smol, demo:chat, demo:adapter ... name the built-in demo models (built on first use)
# The adapters of the config applied in order, as one adapter beside them (see apply_adapters).
STACKED_ADAPTER = "__stacked__"


def _demo_model(name: str, *, key: str) -> Path:
    from stoker.demo import DEMO_MODELS, ensure_demo_models

    which = name[len(DEMO_PREFIX) :]
    if which not in DEMO_MODELS:
        choices = ", ".join(DEMO_PREFIX + m for m in DEMO_MODELS)
        raise ConfigError(f"invalid value for {key}: {name!r}; the demo models are {choices}.")
    return ensure_demo_models(names=[which])[which]  # only this one (and what it builds on): each costs minutes


def _is_hub_id(name: str) -> bool:
    return not name.startswith((".", "/", "~")) and name.count("/") == 1 and all(name.split("/"))


def resolve_model_path(name: str | None, *, key: str = "model_name_or_path", settings: Settings | None = None) -> Path:
    """A local folder for ``name``: the folder itself, or the hub snapshot in the local cache."""
    if not name:
        raise ConfigError(f"{key} is not set. Give a local model folder or a Hugging Face hub id (e.g. {key}: ./my-model).")
    if name.startswith(DEMO_PREFIX):
        return _demo_model(name, key=key)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return path.parent  # the GGUF file is found again by gguf_of
    if path.exists():
        raise ConfigError(f"invalid value for {key}: {name!r} is a file; expected a model folder, a .gguf file or a "
                          "hub id.")
    if not _is_hub_id(name):
        raise ConfigError(
            f"invalid value for {key}: the folder {shown(name)} does not exist. Expected a local model folder or a "
            "Hugging Face hub id such as 'org/model'."
        )
    return _from_hub(name, key=key, settings=settings)


def _from_hub(repo_id: str, *, key: str, settings: Settings | None) -> Path:
    from huggingface_hub import snapshot_download

    cache_dir = settings.cache_dir if settings else None
    revision = settings.model_revision if settings else None
    token = settings.hf_hub_token if settings else None
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss in the cache means: try the hub, or explain
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    where = cache_dir or os.environ.get("HF_HUB_CACHE") or "~/.cache/huggingface/hub"
    if offline:
        raise ModelLoadError(
            f"{key}: {repo_id!r} is not a local folder and is not in the Hugging Face cache ({where}), and "
            "HF_HUB_OFFLINE is set. Download it on a machine with network access, or point "
            f"{key} at a local folder."
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token))
    except Exception as exc:  # noqa: BLE001 - network, auth and not-found errors all end here
        raise ModelLoadError(
            f"{key}: could not download {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}), and it is not in the local cache ({where}). "
            f"If this machine is offline, point {key} at a local model folder."
        ) from None


def gguf_of(settings: Settings, path: Path) -> str | None:
    """The GGUF file in ``path`` the config means, or None (see ``models.gguf``)."""
    from stoker.models.gguf import gguf_file

    return gguf_file(settings.model_name_or_path, path, settings.gguf_file)


def load_tokenizer(settings: Settings, path: Path | None = None) -> Any:
    from transformers import AutoTokenizer

    path = path or resolve_model_path(settings.model_name_or_path, settings=settings)
    gguf = gguf_of(settings, path)
    if gguf:
        check_gguf_architecture(path / gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(path), use_fast=settings.use_fast_tokenizer, trust_remote_code=settings.trust_remote_code,
            split_special_tokens=settings.split_special_tokens, **({"gguf_file": gguf} if gguf else {}),
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {exc}") from None
    from stoker.models.options import check_added_tokens

    check_added_tokens(settings, tokenizer)
    if tokenizer.pad_token_id is None:
        # Batching needs a pad id; it is masked out, so any id will do and eos is always present.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def adapter_paths(settings: Settings) -> dict[str, Path]:
    """The config's adapters in the order they apply, keyed by the id each is served under.

    An entry is a path or hub id, or ``name=path`` to choose the id. Without a name the id is the last component of
    the path as written (``saves/qwen/lora/sft`` is ``sft``, ``demo:adapter`` stays ``demo:adapter``); a repeated id
    takes its parent folder's name in front (``qwen/sft``). ``adapter_folder`` is LLaMA-Factory's: the sub-folder of
    each adapter path that holds the adapter's files.
    """
    out: dict[str, Path] = {}
    for entry in settings.adapter_name_or_path:
        name, sep, written = entry.partition("=")
        if not sep or not name or "/" in name:
            name, written = "", entry
        path = resolve_model_path(written, key="adapter_name_or_path", settings=settings)
        if settings.adapter_folder:
            path = path / settings.adapter_folder
        if not (path / "adapter_config.json").is_file():
            inside = f" (adapter_folder {settings.adapter_folder!r} inside it)" if settings.adapter_folder else ""
            raise ConfigError(
                f"invalid value for adapter_name_or_path: {shown(written)}{inside} has no adapter_config.json; expected a "
                "LoRA adapter folder saved by peft (or LLaMA-Factory)."
            )
        out[_adapter_id(name, written, out)] = path
    return out


def _adapter_id(name: str, written: str, taken: dict[str, Path]) -> str:
    if name:
        if name in taken:
            raise ConfigError(f"invalid value for adapter_name_or_path: two adapters are named {name!r}; give each "
                              "its own name (name=path).")
        return name
    parts = [p for p in written.replace("\\", "/").split("/") if p]
    key = parts[-1] if parts else written
    if key in taken and len(parts) > 1:
        key = "/".join(parts[-2:])
    base, n = key, 2
    while key in taken:
        key, n = f"{base}-{n}", n + 1
    return key


def pick_device(settings: Settings) -> str:
    import torch

    if settings.device != "auto":
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("invalid value for device: 'cuda' but no CUDA GPU is visible; use device: auto or cpu.")
        return settings.device
    if not settings.low_cpu_mem_usage:
        return "cpu"  # LLaMA-Factory then passes no device map, and the model stays where it loads
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_model(
    settings: Settings,
    *,
    path: Path | None = None,
    adapters: dict[str, Path] | None = None,
    merge: bool | None = None,
    stack: bool = False,
) -> LoadedModel:
    """Load the base model and apply the config's adapters.

    ``path`` and ``adapters``: already resolved (by default from the settings). ``merge``: fold the adapters into the
    weights (fast, fixed) or keep them as named peft adapters that a request can select. Default:
    ``settings.merge_adapters``. ``stack``: unmerged, also add ``STACKED_ADAPTER`` (see ``apply_adapters``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from stoker.models.options import pick_dtype

    # transformers' per-tensor "Loading weights" bar would land in the chat's screen and in logs; Stoker says when
    # the model is ready instead (--debug keeps the bar).
    if not logger.isEnabledFor(logging.DEBUG):
        hf_logging.disable_progress_bar()
    path = path or resolve_model_path(settings.model_name_or_path, settings=settings)
    tokenizer = load_tokenizer(settings, path)
    device = pick_device(settings)
    dtype = pick_dtype(settings, device)
    gguf = gguf_of(settings, path)
    source = {"gguf_file": gguf} if gguf else {}
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=settings.trust_remote_code, **source)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot read the model config in {path}: {exc}") from None
    kwargs = {**_load_kwargs(settings, config, device, dtype), **source}
    processor = None
    from stoker.models.vision import is_vision_config, load_vision_model

    if is_vision_config(config, settings):
        model, processor = load_vision_model(path, settings, kwargs)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot load the model from {path}: {type(exc).__name__}: {exc}") from None
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()  # the engines run under torch.inference_mode; grad mode is left alone for the caller
    if settings.print_param_status:
        from stoker.models.options import log_param_status

        log_param_status(model)

    adapters = adapter_paths(settings) if adapters is None else adapters
    merge = settings.merge_adapters if merge is None else merge
    if adapters:
        model = apply_adapters(model, adapters, merge=merge, stack=stack)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=path,
        generation_config=read_generation_config(path),
        adapters=adapters,
        merged=bool(adapters) and merge,
        processor=processor,
    )


def check_gguf_architecture(file: Path) -> None:
    """transformers dequantizes GGUF files of the architectures it maps; name the others before loading."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    from stoker.models.gguf import architecture, read_metadata

    arch = architecture(read_metadata(file))
    if arch not in GGUF_CONFIG_MAPPING:
        known = ", ".join(sorted(a for a in GGUF_CONFIG_MAPPING if a not in ("general", "tokenizer")))
        raise ModelLoadError(f"the GGUF file {file.name} holds a {arch!r} model, an architecture transformers cannot "
                             f"load from GGUF (it loads: {known}). Use the model's Hugging Face folder instead.")


def _load_kwargs(settings: Settings, config: Any, device: str, dtype: Any) -> dict[str, Any]:
    """``from_pretrained`` keywords: dtype, and LLaMA-Factory's RoPE, attention and quantization keys."""
    from stoker.models.options import attention_implementation, quantization_config, scale_rope

    scale_rope(settings, config)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": settings.trust_remote_code, "config": config}
    attention = attention_implementation(settings, device)
    if attention is not None:
        kwargs["attn_implementation"] = attention
    quantization = quantization_config(settings, config, device)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        # As LLaMA-Factory: a quantized model loads onto one device (bitsandbytes places it as it quantizes).
        kwargs["device_map"] = {"": device}
    if settings.tf32 is not None and device == "cuda":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = settings.tf32
        torch.backends.cudnn.allow_tf32 = settings.tf32
    return kwargs


def apply_adapters(model: Any, adapters: dict[str, Path], *, merge: bool, stack: bool = False) -> Any:
    """Apply LoRA adapters in order. Merged: each folded into the weights before the next is applied.

    ``stack`` (unmerged): also add ``STACKED_ADAPTER``, their deltas side by side in one adapter (peft's "cat"
    combination, rank the sum of theirs). A LoRA delta does not depend on the weights it is added to, so this one
    adapter gives what merging them in order gives, while each stays selectable on its own.
    """
    from peft import PeftModel

    peft_model = None
    for name, path in adapters.items():
        try:
            if merge:
                model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
            elif peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
            else:
                peft_model.load_adapter(str(path), adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - shape mismatches and missing modules come in many types
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(
                f"the adapter {str(path)!r} does not fit the base model: {detail[:400]}. Check that it was trained "
                "on this model_name_or_path."
            ) from None
    if peft_model is not None:
        if stack and len(adapters) > 1:
            try:
                peft_model.add_weighted_adapter(list(adapters), [1.0] * len(adapters), STACKED_ADAPTER,
                                                combination_type="cat")
            except (ValueError, TypeError, NotImplementedError) as exc:
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ModelLoadError(
                    f"the adapters {', '.join(adapters)} cannot be served together as the configured model: "
                    f"{detail[:300]}. Merge them into the model first, or configure one adapter."
                ) from None
        peft_model.eval()
        return peft_model
    return model
