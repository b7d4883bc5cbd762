"""What the page shows: a session's turns as the Chatbot's messages, with Markdown rendered to safe HTML here.

Markdown is rendered on the server with raw HTML turned off, so any ``<tag>`` a user types or a model writes
becomes visible text, never markup. The Chatbot then receives finished HTML (``render_markdown=False``) and still
sanitises it in the browser: two independent layers between model output and a script.
"""

from __future__ import annotations

import html
import json
from functools import lru_cache
from typing import Any

from stoker.webchat.session import Column, Turn

# The Chatbot's elem_id: code-highlighting styles are scoped under it.
CHATBOT_ID = "stoker-chat"
THINKING_TITLE = "Thinking"
CUT_NOTE = "(reply cut at max new tokens)"
STOPPED_NOTE = "(stopped)"


@lru_cache(maxsize=1)
def _markdown() -> Any:
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "breaks": True, "highlight": _highlight})
    md.enable(["table", "strikethrough"])
    # A model's ![x](http://...) would make the reader's browser fetch any address; links are shown instead.
    md.disable("image")

    def link_open(renderer: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        # Links leave the chat in a new tab, without handing the page to the target.
        tokens[idx].attrSet("target", "_blank")
        tokens[idx].attrSet("rel", "noopener noreferrer nofollow")
        return renderer.renderToken(tokens, idx, options, env)

    md.add_render_rule("link_open", link_open)
    return md


def _highlight(code: str, lang: str, _attrs: str) -> str:
    """Pygments token spans for a fenced block in a known language; "" lets markdown-it escape it plainly."""
    if not lang:
        return ""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import get_lexer_by_name
    from pygments.util import ClassNotFound

    try:
        lexer = get_lexer_by_name(lang)
    except ClassNotFound:
        return ""
    return highlight(code, lexer, HtmlFormatter(nowrap=True))


def markdown_html(text: str) -> str:
    """Markdown (CommonMark, tables, strikethrough, hard line breaks) to HTML; raw HTML in ``text`` is escaped."""
    return _markdown().render(text).strip()


def code_html(text: str) -> str:
    return f"<pre><code>{html.escape(text, quote=False)}</code></pre>"


def arguments_html(arguments: str) -> str:
    """A tool call's JSON arguments, pretty-printed when they parse."""
    try:
        pretty = json.dumps(json.loads(arguments), indent=2, ensure_ascii=False)
    except (json.JSONDecodeError, TypeError):
        pretty = arguments
    return code_html(pretty)


def _text(role: str, body: str, title: str | None = None, status: str | None = None) -> dict[str, Any]:
    # A {"type": "text"} dict reaches the browser as is (a bare string would be dedented by Gradio first).
    message: dict[str, Any] = {"role": role, "content": {"type": "text", "text": body}}
    if title is not None:
        # Titles are HTML too (render_markdown=False): escape, since tool names come from model output.
        message["metadata"] = {"title": html.escape(title)}
        if status is not None:
            message["metadata"]["status"] = status
    return message


def turn_messages(turn: Turn, *, live: bool = False) -> list[dict[str, Any]]:
    """One turn as Chatbot messages. ``live``: the reply is still streaming (its thinking block shows a spinner)."""
    out: list[dict[str, Any]] = []
    if turn.role == "tool":
        out.append(_text("user", code_html(turn.text), title=f"Tool result: {turn.tool_name or 'tool'}"))
    else:
        out.extend({"role": "user", "content": {"path": path}} for path in turn.images)
        if turn.text:
            out.append(_text("user", markdown_html(turn.text)))
    if turn.reasoning:
        thinking_done = not live or bool(turn.reply or turn.tool_calls)
        out.append(
            _text("assistant", markdown_html(turn.reasoning), THINKING_TITLE, "done" if thinking_done else "pending")
        )
    if turn.reply:
        out.append(_text("assistant", markdown_html(turn.reply)))
    for call in turn.tool_calls:
        out.append(_text("assistant", arguments_html(call.arguments), title=f"Tool call: {call.name}"))
    if turn.finish_reason == "length":
        out.append(_text("assistant", f"<p><em>{CUT_NOTE}</em></p>"))
    elif turn.finish_reason is None and not live:
        # Stop was pressed (or the page went away) before the reply ended.
        out.append(_text("assistant", f"<p><em class='stoker-stopped'>{STOPPED_NOTE}</em></p>"))
    return out


def compare_messages(text: str, column: Column | None) -> list[dict[str, Any]]:
    """One Compare column: the message, and that model's reply (nothing when the model was not chosen)."""
    if column is None:
        return []
    turn = Turn(text=text, reply=column.reply, reasoning=column.reasoning, finish_reason=column.finish_reason)
    return turn_messages(turn, live=column.finish_reason is None)


def chat_messages(turns: list[Turn], *, live: bool = False) -> list[dict[str, Any]]:
    """All turns as Chatbot messages; ``live`` marks the last turn as still streaming."""
    out: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        out.extend(turn_messages(turn, live=live and i == len(turns) - 1))
    return out


@lru_cache(maxsize=1)
def page_css() -> str:
    """Code-highlighting colours (light and dark), scoped to the chat so Gradio's own styles stay untouched."""
    from pygments.formatters import HtmlFormatter

    scope = f"#{CHATBOT_ID} pre code"
    light = HtmlFormatter(style="default").get_token_style_defs(scope)
    dark = HtmlFormatter(style="monokai").get_token_style_defs(f".dark {scope}")
    return "\n".join([*light, *dark])
