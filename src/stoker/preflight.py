"""What a config can be checked for before anything heavy loads, and ``stoker check``'s report of it.

Every command runs ``preflight`` first: the model and adapter paths resolve (relative to the current folder), the
template and tool format exist, the backend and quantization packages are installed, the adapters fit the backend,
and for predict the datasets are defined and their files exist. A bad config therefore fails in well under a second,
not after the model has loaded. Nothing here imports torch or transformers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stoker.config import GREEDY_DEFAULTS, Settings
from stoker.errors import ConfigError, TemplateError
from stoker.models.facts import ModelFacts, read_generation_config, read_model_facts

Command = Literal["chat", "webchat", "api", "predict"]
PER_REQUEST = {"api"}  # commands that keep adapters selectable per request


@dataclass
class Preflight:
    """What will load, as far as it is known without loading it."""

    model: Path
    facts: ModelFacts
    adapters: dict[str, Path]
    adapter_plan: Any  # engines.factory.AdapterPlan
    template: str
    generation_config: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def preflight(settings: Settings, command: Command) -> Preflight:
    from stoker.engines.factory import check_backend_takes, plan_adapters
    from stoker.models.loader import adapter_paths, gguf_of, resolve_model_path

    path = resolve_model_path(settings.model_name_or_path, settings=settings)
    adapters = adapter_paths(settings)
    gguf = gguf_of(settings, path)
    check_backend_takes(settings, gguf)
    facts = read_model_facts(path, gguf)
    quantized = settings.quantization_bit is not None or facts.quant_method is not None
    if settings.compare:
        if command != "predict":
            raise ConfigError(f"compare is a predict key (one run answered by several models); stoker {command} "
                              "does not read it: remove it.", param="compare")
        from stoker.predict.compare import compare_targets

        compare_targets(settings, list(adapters))
    per_request = command in PER_REQUEST or bool(settings.compare)
    plan = plan_adapters(settings, adapters, per_request=per_request, quantized=quantized)
    _check_template(settings, path, gguf)
    _check_packages(settings, facts)
    from stoker.engines.structured import configured

    if configured(settings) is not None and importlib.util.find_spec("xgrammar") is None:
        raise ConfigError("json_schema / response_format constrain decoding with the xgrammar package, which is not "
                          "installed: pip install xgrammar (the Makefile's set-up installs it).", param="json_schema")
    if settings.visual_inputs and not facts.vision:
        from stoker.models.vision import check_visual_inputs

        check_visual_inputs(settings, vision=False)
    if settings.media_dir and not Path(settings.media_dir).expanduser().is_dir():
        from stoker.paths import shown

        raise ConfigError(f"invalid value for media_dir: {shown(settings.media_dir)} is not a folder.",
                          param="media_dir")
    if command == "predict":
        from stoker.predict.data import check_datasets

        if settings.output_dir is None:
            raise ConfigError("predict writes its files to output_dir, which is not set: add output_dir: "
                              "path/to/folder to the config (or pass output_dir=...).", param="output_dir")
        check_datasets(settings.eval_dataset or settings.dataset, settings.dataset_dir)
    template = settings.template or "auto"
    return Preflight(path, facts, adapters, plan, template, read_generation_config(path))


def _check_template(settings: Settings, path: Path, gguf: str | None) -> None:
    from stoker.templates import list_templates
    from stoker.templates.tools import FORMATS

    name = (settings.template or "auto").strip()
    if name != "auto" and name not in list_templates() and name.lower().replace("-", "_") not in list_templates():
        from stoker.templates import get_template

        get_template(name)  # raises the unknown-template error, with its suggestions
    if name == "auto" and not _has_chat_template(path, gguf):
        raise TemplateError(
            f"template: auto (or no template) uses the tokenizer's own chat_template, but the tokenizer in {path} has "
            "none. Name a template (see `stoker template list`).", param="template")
    if settings.tool_format is not None and settings.tool_format not in FORMATS:
        raise TemplateError(f"unknown tool_format {settings.tool_format!r}: expected one of "
                            f"{', '.join(sorted(FORMATS))}.", param="tool_format")


def _has_chat_template(path: Path, gguf: str | None) -> bool:
    if gguf is not None:
        from stoker.models.gguf import read_metadata

        return bool(read_metadata(path / gguf).get("tokenizer.chat_template"))
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return True  # not readable here: the tokenizer's loader decides (and explains)
    return bool(config.get("chat_template"))


def _check_packages(settings: Settings, facts: ModelFacts) -> None:
    if settings.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        from stoker.engines.vllm_args import INSTALL_HINT

        raise ConfigError(f"infer_backend: vllm needs the vllm package, which is not installed. {INSTALL_HINT}",
                          param="infer_backend")
    if settings.quantization_bit is not None and settings.quantization_method == "bnb" and \
            importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("quantization_method: bnb needs the bitsandbytes package, which is not installed: pip "
                          "install stoker[quant].", param="quantization_bit")


# --------------------------------------------------------------------------------------------------------------------
# stoker check
def report(settings: Settings, command: Command = "chat") -> str:
    """Every resolved setting with where it came from, and what will load, as text."""
    plan = preflight(settings, command)
    lines = [f"config: {settings.source or '(none: command line and defaults)'}", ""]
    lines.append(f"model: {settings.model_name_or_path} -> {plan.model}")
    shape = ", ".join(part for part in (
        plan.facts.model_type, f"context {plan.facts.context_length}" if plan.facts.context_length else None,
        "vision" if plan.facts.vision else None,
        f"quantized ({plan.facts.quant_method})" if plan.facts.quant_method else None) if part)
    if shape:
        lines.append(f"  {shape}")
    for name, folder in plan.adapters.items():
        lines.append(f"adapter: {name} -> {folder}")
    if plan.adapters:
        how = ("merged into the weights in order" if plan.adapter_plan.merge else
               "kept apart, chosen per request (the configured model applies them in order)"
               if plan.adapter_plan.per_request else f"kept apart, applied to every request ({plan.adapter_plan.default})")
        lines.append(f"  adapters {how} (for `stoker {command}`)")
    lines.append(f"template: {plan.template}" + (" (the tokenizer's own chat template)" if plan.template == "auto"
                                                 else ""))
    lines.append(f"backend: {settings.backend}" + (f", quantized on the fly to {settings.quantization_bit} bits "
                                                   f"({settings.quantization_method})"
                                                   if settings.quantization_bit else ""))
    lines += ["", "generation (unset keys come from generation_config.json, else greedy):"]
    for key, fallback in GREEDY_DEFAULTS.items():
        value = getattr(settings, key)
        if value is not None:
            origin = settings.origins.get(key, "file")
        elif key in plan.generation_config and plan.generation_config[key] is not None:
            value, origin = plan.generation_config[key], "generation_config.json"
        else:
            value, origin = fallback, "default"
        lines.append(f"  {key} = {value!r}  ({origin})")
    lines += ["", "settings given:"]
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        if f.name in ("source", "origins") or f.name in GREEDY_DEFAULTS:
            continue
        value = getattr(settings, f.name)
        origin = settings.origins.get(f.name)
        if origin is None and value == getattr(defaults, f.name):
            continue
        shown_value = "***" if f.name in ("api_key", "hf_hub_token") and value else repr(value)
        lines.append(f"  {f.name} = {shown_value}  ({origin or 'default'})")
    return "\n".join(lines) + "\n"
