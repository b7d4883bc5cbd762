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

AUTO = "auto"


def list_templates() -> list[str]:
    return sorted(TEMPLATES)


def get_template(
    name: str | None, tokenizer: Any | None = None, *, extra_stop_ids: Sequence[int] | None = None
) -> Template:
    """The template called ``name``; ``None`` or ``"auto"`` renders with the tokenizer's own chat_template.

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

        return auto_template(tokenizer, extra_stop_ids=stops)
    template = TEMPLATES.get(key) or TEMPLATES.get(key.lower().replace("-", "_"))
    if template is None:
        near = difflib.get_close_matches(key.lower(), list(TEMPLATES), n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise TemplateError(
            f"unknown template {name!r}: {hint}Use `template: auto` for the model's own chat template, or one of the "
            "names `stoker template list` prints.",
            param="template",
        )
    return template.bind(tokenizer, extra_stop_ids=stops)


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
