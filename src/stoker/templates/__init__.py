"""Chat templates: the built-in families, ``template: auto`` and the mismatch guard.

    get_template(name, tokenizer)        -> Template (bound to the tokenizer's bos/eos and stop ids)
    list_templates()                     -> the built-in names
    check_template_mismatch(t, tokenizer) -> a one-line warning, or None

Nothing here imports torch or transformers; Jinja is imported only when a Jinja template is rendered.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from stoker.errors import TemplateError
from stoker.models.facts import folder_eos_ids
from stoker.templates.base import Message, ParsedReply, Template, Tool, ToolCall
from stoker.templates.mismatch import check_template_mismatch
from stoker.templates.registry import TEMPLATES
from stoker.templates.tools import FORMATS

AUTO = "auto"


def list_templates() -> list[str]:
    return sorted(TEMPLATES)


def get_template(
    name: str | None,
    tokenizer: Any | None = None,
    *,
    extra_stop_ids: Sequence[int] | None = None,
    tool_format: str | None = None,
    preserve_thinking: bool = False,
) -> Template:
    """The template called ``name``; ``None`` or ``"auto"`` renders with the tokenizer's own chat_template.

    ``tool_format`` replaces the family's tool format (LLaMA-Factory's key of that name); ``preserve_thinking`` keeps
    the reasoning of earlier assistant turns in the prompt.

    Stop ids are the tokenizer's eos, the family's end-of-turn tokens, and ``extra_stop_ids`` (by default the eos
    ids of the model folder a tokenizer was loaded from, by the rule every engine stops on).
    """
    key = (name or AUTO).strip()
    if extra_stop_ids is None:
        extra_stop_ids = folder_eos_ids(getattr(tokenizer, "name_or_path", None), tokenizer)
    stops = list(extra_stop_ids)
    if key == AUTO:
        if tokenizer is None:
            raise TemplateError(
                "template: auto renders with the model's own chat_template, so it needs the tokenizer; name a "
                "template instead (see `stoker template list`)."
            )
        from stoker.templates.jinja import auto_template

        return _with_options(auto_template(tokenizer, extra_stop_ids=stops), tool_format, preserve_thinking)
    template = TEMPLATES.get(key) or TEMPLATES.get(key.lower().replace("-", "_"))
    if template is None:
        near = difflib.get_close_matches(key.lower(), list(TEMPLATES), n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise TemplateError(
            f"unknown template {name!r}: {hint}Use `template: auto` for the model's own chat template, or one of the "
            "names `stoker template list` prints.",
            param="template",
        )
    return _with_options(template.bind(tokenizer, extra_stop_ids=stops), tool_format, preserve_thinking)


def _with_options(template: Template, tool_format: str | None, preserve_thinking: bool) -> Template:
    if tool_format is not None:
        if tool_format not in FORMATS:
            near = difflib.get_close_matches(tool_format, list(FORMATS), n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise TemplateError(f"unknown tool_format {tool_format!r}: expected one of {', '.join(sorted(FORMATS))}."
                                f"{hint}", param="tool_format")
        template.tools = FORMATS[tool_format]
    template.preserve_thinking = preserve_thinking
    return template


__all__ = [
    "Message",
    "ParsedReply",
    "Template",
    "TemplateError",
    "Tool",
    "ToolCall",
    "check_template_mismatch",
    "get_template",
    "list_templates",
]
