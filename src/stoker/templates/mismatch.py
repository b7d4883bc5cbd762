"""The mismatch guard: a config names a template, the tokenizer ships its own, and the two disagree."""

from __future__ import annotations

from typing import Any

from stoker.errors import TemplateError
from stoker.templates.base import Template
from stoker.templates.jinja import chat_template_of, render_jinja, special_tokens_of

# Probe conversations, tried in order: a template that rejects a system message still gets compared without one,
# and the second probe catches a differing default system prompt.
PROBES = (
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi there. How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi there. How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
)


def check_template_mismatch(template: Template, tokenizer: Any) -> str | None:
    """A one-line warning when ``template`` renders a probe conversation differently from the tokenizer's own
    ``chat_template``; None when they agree, or when the tokenizer has none (or it cannot render the probe)."""
    source = chat_template_of(tokenizer)
    if source is None:
        return None
    bind = getattr(template, "bind", None)
    ours_template = bind(tokenizer) if callable(bind) else template
    for probe in PROBES:
        try:
            theirs = render_jinja(
                source, probe, add_generation_prompt=True, special_tokens=special_tokens_of(tokenizer)
            )
        except TemplateError:
            continue
        try:
            ours = ours_template.render(probe, add_generation_prompt=True)
        except TemplateError:
            continue
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            return (
                f"template {template.name!r} renders a probe conversation differently from the tokenizer's own "
                f"chat_template (first difference at character {at}: {template.name} writes "
                f"{ours[at:at + 40]!r}, the tokenizer's writes {theirs[at:at + 40]!r}); set `template: auto` to use "
                f"the tokenizer's, or keep {template.name!r} if the model was fine-tuned with it."
            )
    return None
