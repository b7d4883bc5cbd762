"""Rendering Hugging Face Jinja chat templates the way transformers does, and ``template: auto`` built on it.

transformers renders chat templates in an immutable sandbox with ``trim_blocks``/``lstrip_blocks``, a ``tojson``
that keeps non-ASCII text and accepts ``indent``, and the globals ``raise_exception`` and ``strftime_now``. The
renderer here reproduces that (tests compare it with transformers on every official template), so
``template: auto`` prompts are byte-identical to ``tokenizer.apply_chat_template`` without importing transformers.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from stoker.errors import TemplateError
from stoker.templates.base import Message, Template, Tool, continued
from stoker.templates.conversation import normalize, to_hf_messages
from stoker.templates.reasoning import Thinking
from stoker.templates.tools import FORMATS, ToolFormat


class ChatTemplateRejected(TemplateError):
    """The Jinja template itself refused the conversation (its ``raise_exception``)."""


def _raise(message: str) -> None:
    raise ChatTemplateRejected(f"the chat template rejects this conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(source: str) -> Any:
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """``{% generation %}`` marks assistant tokens for training masks; rendering keeps the body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"the chat template is not valid Jinja (line {exc.lineno}: {exc.message}).") from None


def render_jinja(
    source: str,
    messages: list[Message],
    *,
    tools: list[Tool] | None = None,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    **variables: Any,
) -> str:
    """Render like ``transformers.utils.chat_template_utils.render_jinja_template``: messages as given, special
    tokens (bos_token, eos_token, ...) and extra variables as template variables. Variables set to None are left
    undefined, as transformers leaves out kwargs that were not passed."""
    template = compile_template(source)
    context = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    context.update({k: v for k, v in variables.items() if v is not None})
    try:
        return template.render(messages=messages, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **context)
    except TemplateError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken template is the user's (or the model's) file, not a bug here
        raise TemplateError(
            f"the chat template failed to render this conversation: {type(exc).__name__}: {exc}"
        ) from None


SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def special_tokens_of(tokenizer: Any) -> dict[str, str]:
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = getattr(tokenizer, name, None)
        if isinstance(value, str):
            out[name] = value
    return out


def chat_template_of(tokenizer: Any) -> str | None:
    """The tokenizer's chat template (the "default" one when it ships several), or None."""
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):
        source = source.get("default")
    return source if isinstance(source, str) and source.strip() else None


def guess_tool_format(source: str) -> ToolFormat:
    """The tool-call format a Jinja template writes, recognised by its markers."""
    if "[TOOL_CALLS]" in source:
        return FORMATS["mistral"]
    if "tool▁calls▁begin" in source:
        return FORMATS["deepseek3"]
    if "<tool_call>" in source:
        return FORMATS["qwen"]
    if "<|python_tag|>" in source or '"parameters"' in source or "<|python_start|>" in source:
        return FORMATS["llama3"]
    if "<|observation|>" in source:
        return FORMATS["glm4"]
    return FORMATS["default"]


class JinjaTemplate(Template):
    """``template: auto``: the tokenizer's own chat template, rendered as transformers renders it."""

    def __init__(self, source: str, *, special_tokens: dict[str, str] | None = None, name: str = "auto",
                 extra_stop_ids: list[int] | None = None):
        self.name = name
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.eos_token = self.special_tokens.get("eos_token", "")
        self.default_system = None
        self.stop_words = []
        self.image_token = None
        self.tools = guess_tool_format(source)
        self.thinking = Thinking() if "<think>" in source or "</think>" in source else None
        self.extra_stop_ids = list(extra_stop_ids or [])
        self.description = "the tokenizer's own chat_template"
        compile_template(source)  # fail at load time, not on the first request

    def __repr__(self) -> str:
        return f"<template {self.name} (jinja)>"

    def render(self, messages: list[Message], *, tools: list[Tool] | None = None, add_generation_prompt: bool = True,
               enable_thinking: bool | None = None, continue_final_message: bool = False,
               variables: dict[str, Any] | None = None) -> str:
        normalize(messages, image_token="")  # the same checks (and messages) as built-in templates; parts pass through
        extra = {k: v for k, v in (variables or {}).items() if k not in ("enable_thinking", "preserve_thinking")}
        taken = sorted(set(extra) & {"messages", "tools", "documents", "add_generation_prompt", *SPECIAL_TOKEN_NAMES})
        if taken:
            raise TemplateError(f"chat_template_kwargs cannot set {', '.join(taken)}: the conversation and the "
                                "tokenizer's special tokens set them.")
        text = render_jinja(
            self.source, to_hf_messages(messages), tools=list(tools) if tools else None,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            special_tokens=self.special_tokens, **extra,
            enable_thinking=enable_thinking, preserve_thinking=self.preserve_thinking or None,
        )
        return continued(text, messages) if continue_final_message else text

    def encode(self, tokenizer: Any, messages: list[Message], *, tools: list[Tool] | None = None,
               add_generation_prompt: bool = True, enable_thinking: bool | None = None,
               continue_final_message: bool = False, variables: dict[str, Any] | None = None) -> list[int]:
        text = self.render(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                           enable_thinking=enable_thinking, continue_final_message=continue_final_message,
                           variables=variables)
        return list(tokenizer.encode(text, add_special_tokens=False))

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        eos = getattr(tokenizer, "eos_token_id", None)
        ids = ([eos] if isinstance(eos, int) else []) + self.extra_stop_ids
        return list(dict.fromkeys(ids))


def auto_template(tokenizer: Any, *, extra_stop_ids: list[int]) -> JinjaTemplate:
    source = chat_template_of(tokenizer)
    if source is None:
        raise TemplateError(
            "template: auto needs the tokenizer's chat_template, but this tokenizer has none. Name a template "
            f"instead, e.g. `template: {suggest_for(tokenizer)}` (list them with `stoker template list`)."
        )
    return JinjaTemplate(source, special_tokens=special_tokens_of(tokenizer), extra_stop_ids=list(extra_stop_ids))


def suggest_for(tokenizer: Any) -> str:
    """A built-in template name that fits a tokenizer's special tokens (a hint for error messages)."""
    vocab: Any = ()
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001
        pass
    for token, name in (("<|start_header_id|>", "llama3"), ("<|header_start|>", "llama4"), ("<|im_start|>", "chatml"),
                        ("<start_of_turn>", "gemma"), ("[INST]", "mistral"), ("<｜User｜>", "deepseek3")):
        if token in vocab:
            return name
    return "default"
