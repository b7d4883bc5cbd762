"""The chat page: a Gradio Blocks app around one ``ChatService``.

Each browser session keeps its own turns in a ``gr.State``; replies stream from ``session.stream_reply``. Up to
``max_num_seqs`` sessions generate at once, so the engine can batch them; the rest wait in Gradio's queue.
"""

from __future__ import annotations

import html
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import gradio as gr

from stoker.chat import ChatService
from stoker.config import Settings
from stoker.errors import StokerError
from stoker.webchat.render import CHATBOT_ID, chat_messages, compare_messages, page_css
from stoker.webchat.session import (
    TOOLS_EXAMPLE,
    ChatOptions,
    Turn,
    compare_choices,
    compare_replies,
    conversation,
    parse_tools,
    prepare,
    stream_reply,
)

EMPTY_INPUT: dict[str, Any] = {"text": "", "files": []}
# The Stop button while a reply streams, and otherwise (greyed out, not the alarming red).
BUSY: dict[str, Any] = gr.update(interactive=True, variant="stop")
IDLE: dict[str, Any] = gr.update(interactive=False, variant="secondary")
MAX_NEW_TOKENS_CAP = 8192


def _system_placeholder(service: ChatService) -> str:
    default = service.settings.default_system or service.template.default_system
    if default:
        return f"Empty: the default, {default!r}"
    return "Empty: no system prompt"


def user_error(exc: StokerError) -> gr.Error:
    # A toast with the message; a user's mistake is no reason for a traceback in the server's log.
    return gr.Error(exc.message, print_exception=False)


def build_ui(service: ChatService) -> gr.Blocks:
    gen = service.generation
    vision = service.info.vision
    max_tokens_limit = max(1, min(service.max_model_len - 1, MAX_NEW_TOKENS_CAP))
    default_temperature = float(gen["temperature"]) if gen["do_sample"] else 0.0
    # Templates that think in <think> blocks get a switch for it.
    reasoning = bool(service.template.reasoning_markers)
    compare_ids = compare_choices(service)

    with gr.Blocks(
        title=f"Stoker · {service.describe()}",
        analytics_enabled=False,
        fill_height=True,
        # Uploaded images older than a day leave the server's temp folder (checked hourly).
        delete_cache=(3600, 86400),
    ) as blocks:
        turns = gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                gr.HTML(f"<h2 id='stoker-title'>Stoker · {html.escape(service.describe())}</h2>")
                with gr.Tabs():
                    with gr.Tab("Chat", id="chat"):
                        chatbot = gr.Chatbot(
                            elem_id=CHATBOT_ID,
                            show_label=False,
                            height="62vh",
                            # Markdown is rendered to escaped HTML on the server (render.py); the browser
                            # sanitises it again.
                            render_markdown=False,
                            sanitize_html=True,
                            allow_tags=False,
                            latex_delimiters=[],
                            buttons=["copy", "copy_all"],
                            feedback_options=None,
                            placeholder="Ask anything. Enter sends, Shift+Enter starts a new line.",
                        )
                        entry = gr.MultimodalTextbox(
                            elem_id="stoker-input",
                            show_label=False,
                            placeholder="Type a message" + (" or attach images" if vision else ""),
                            sources=["upload"] if vision else [],
                            file_types=["image"],
                            file_count="multiple",
                            autofocus=True,
                        )
                        with gr.Row():
                            # Stop is live only while a reply streams (see busy / idle below).
                            stop = gr.Button("Stop", elem_id="stoker-stop", variant="secondary", size="sm", scale=1,
                                             interactive=False)
                            regenerate = gr.Button("Regenerate", elem_id="stoker-regenerate", variant="secondary",
                                                   size="sm", scale=1)
                            edit = gr.Button("Edit last", elem_id="stoker-edit", variant="secondary", size="sm",
                                             scale=1)
                            clear = gr.Button("Clear", elem_id="stoker-clear", variant="secondary", size="sm",
                                              scale=1)
                            download = gr.DownloadButton("Download", elem_id="stoker-download", variant="secondary",
                                                         size="sm", scale=1, value=None)
                    with gr.Tab("Compare", id="compare", visible=bool(compare_ids), elem_id="stoker-compare-tab"):
                        compare_models = gr.CheckboxGroup(
                            compare_ids, value=compare_ids, label="Answer with", elem_id="stoker-compare-models",
                            info="each adapter alone and the base weights, side by side in one batch",
                        )
                        compare_input = gr.Textbox(show_label=False, placeholder="One message for every model",
                                                   elem_id="stoker-compare-input", lines=2)
                        compare_go = gr.Button("Compare", elem_id="stoker-compare-go", variant="primary", size="sm")
                        with gr.Row(equal_height=True):
                            compare_boxes = [
                                gr.Chatbot(label=model_id, elem_id=f"stoker-compare-{i}", height="48vh",
                                           render_markdown=False, sanitize_html=True, allow_tags=False,
                                           latex_delimiters=[], buttons=["copy"], feedback_options=None)
                                for i, model_id in enumerate(compare_ids)
                            ]
            with gr.Column(scale=1, min_width=280):
                system = gr.Textbox(
                    label="System prompt", lines=3, placeholder=_system_placeholder(service), elem_id="stoker-system"
                )
                with gr.Accordion("Sampling", open=True):
                    max_new_tokens = gr.Slider(
                        1, max_tokens_limit, value=min(int(gen["max_new_tokens"]), max_tokens_limit), step=1,
                        label="Max new tokens",
                    )
                    temperature = gr.Slider(
                        0.0, 2.0, value=default_temperature, step=0.05, label="Temperature", info="0 is greedy"
                    )
                    top_p = gr.Slider(0.01, 1.0, value=float(gen["top_p"]), step=0.01, label="Top-p")
                    top_k = gr.Slider(0, 200, value=int(gen["top_k"] or 0), step=1, label="Top-k", info="0 is off")
                thinking = gr.Checkbox(
                    value=service.settings.enable_thinking is not False, label="Thinking",
                    info="let the model reason before it answers", visible=reasoning,
                )
                with gr.Accordion("Tools", open=False):
                    tools = gr.Textbox(
                        label="Tool definitions (JSON)", lines=6, placeholder=TOOLS_EXAMPLE, elem_id="stoker-tools"
                    )
                    role = gr.Radio(
                        ["user", "tool"], value="user", label="Send as",
                        info="'tool' sends your message as the result of the last tool call",
                    )

        def options_of(system_text: str, tools_text: str, role_name: str, max_tokens: float, temp: float, p: float,
                       k: float, think: bool) -> ChatOptions:
            return ChatOptions(
                system=system_text or "",
                tools=parse_tools(tools_text or ""),
                max_new_tokens=int(max_tokens),
                temperature=float(temp),
                top_p=float(p),
                top_k=int(k),
                role="tool" if role_name == "tool" else "user",
                enable_thinking=bool(think) if reasoning else None,
            )

        async def run(history: list[Turn], text: str, files: list[str], options: ChatOptions
                      ) -> AsyncIterator[tuple[Any, list[Turn]]]:
            try:
                prepared = prepare(service, history, text, files, options)
            except StokerError as exc:  # nothing sent: the message stays in the box for the user to fix
                raise user_error(exc) from None
            if prepared.dropped_turns:
                gr.Info(f"The history was too long for the context: dropped the {prepared.dropped_turns} oldest turns.")
            current = prepared.turns
            try:
                async for current in stream_reply(service, prepared):
                    yield chat_messages(current, live=True), current
            except StokerError as exc:
                raise user_error(exc) from None
            yield chat_messages(current), current

        async def respond(
            message: dict[str, Any] | None, history: list[Turn], *controls: Any,
        ) -> AsyncIterator[tuple[Any, list[Turn], Any, Any]]:
            message = message or EMPTY_INPUT
            try:
                options = options_of(*controls)
            except StokerError as exc:
                raise user_error(exc) from None
            # The box empties once, when the message is accepted; after that the user may type the next one.
            entry_update: Any = EMPTY_INPUT
            async for shown, current in run(history, message.get("text") or "", message.get("files") or [], options):
                yield shown, current, entry_update, BUSY
                entry_update = gr.skip()

        async def respond_again(history: list[Turn], *controls: Any) -> AsyncIterator[tuple[Any, list[Turn], Any]]:
            """Regenerate: the last message answered again, with the controls as they are now."""
            if not history:
                raise gr.Error("Nothing to regenerate yet: send a message first.", print_exception=False)
            last = history[-1]
            try:
                options = options_of(*controls[:2], last.role, *controls[2:])
            except StokerError as exc:
                raise user_error(exc) from None
            async for shown, current in run(history[:-1], last.text, list(last.images), options):
                yield shown, current, BUSY

        def edit_last(history: list[Turn]) -> tuple[Any, list[Turn], dict[str, Any]]:
            """The last message back in the box, its turn (and reply) gone: edit it and press Enter to resend."""
            if not history:
                raise gr.Error("There is no message to edit yet.", print_exception=False)
            last = history[-1]
            rest = history[:-1]
            return chat_messages(rest), rest, {"text": last.text, "files": list(last.images)}

        def export(history: list[Turn], system_text: str) -> Any:
            """The conversation as OpenAI-style JSON, for the Download button; nothing while it is empty."""
            if not history:
                return None
            folder = Path(tempfile.mkdtemp(prefix="stoker-chat-"))
            path = folder / "conversation.json"
            path.write_text(json.dumps(conversation(history, system_text or ""), ensure_ascii=False, indent=2),
                            encoding="utf-8")
            return str(path)

        def show(history: list[Turn]) -> tuple[list[dict[str, Any]], Any]:
            return chat_messages(history), IDLE

        def reset() -> tuple[list[Any], list[Turn], Any]:
            return [], [], IDLE

        controls = [system, tools, role, max_new_tokens, temperature, top_p, top_k, thinking]
        generate = entry.submit(
            respond,
            inputs=[entry, turns, *controls],
            outputs=[chatbot, turns, entry, stop],
            api_name="chat",
            show_progress="minimal",
            # Sessions generate side by side so the engine batches them; beyond that, they queue.
            concurrency_limit=service.settings.max_num_seqs,
            concurrency_id="generate",
            # Enter pressed while a reply streams sends the message as soon as that reply is done.
            trigger_mode="always_last",
        )

        async def compare(text: str, chosen: list[str], *controls: Any) -> AsyncIterator[list[Any]]:
            try:
                options = options_of(*controls[:2], "user", *controls[2:])
                async for columns in compare_replies(service, text or "", options, list(chosen or [])):
                    by_id = {c.model: c for c in columns}
                    yield [compare_messages(text, by_id.get(model_id)) for model_id in compare_ids]
            except StokerError as exc:
                raise user_error(exc) from None

        if compare_ids:
            compare_go.click(compare, inputs=[compare_input, compare_models, *controls[:2], *controls[3:]],
                             outputs=compare_boxes, api_name="compare",
                             concurrency_limit=service.settings.max_num_seqs, concurrency_id="generate")

        # Whatever ends a reply (done, failed, cancelled), Stop goes idle and the download holds the conversation.
        generate.then(lambda: IDLE, outputs=[stop], api_visibility="private", queue=False)
        generate.then(export, inputs=[turns, system], outputs=[download], api_visibility="private")

        # Cancel first, then act: an event still streaming could otherwise write its history back afterwards.
        regenerating: list[Any] = []

        def after_cancel(trigger: Any, fn: Any, inputs: list[Any], outputs: list[Any]) -> Any:
            event = trigger(None, cancels=[generate, *regenerating], api_visibility="private").then(
                fn, inputs=inputs, outputs=outputs, api_visibility="private"
            )
            event.then(export, inputs=[turns, system], outputs=[download], api_visibility="private")
            return event

        again = after_cancel(regenerate.click, respond_again, [turns, *controls[:2], *controls[3:]],
                             [chatbot, turns, stop])
        regenerating.append(again)
        again.then(lambda: IDLE, outputs=[stop], api_visibility="private", queue=False)
        # Stop keeps the partial reply, redrawn as finished and marked as stopped.
        after_cancel(stop.click, show, [turns], [chatbot, stop])
        after_cancel(edit.click, edit_last, [turns], [chatbot, turns, entry])
        after_cancel(clear.click, reset, [], [chatbot, turns, stop])
        # The Chatbot's own bin icon empties the display; the session's history must go with it.
        after_cancel(chatbot.clear, reset, [], [chatbot, turns, stop])
    blocks.queue(max_size=service.settings.max_queue)
    return blocks


def launch_options(settings: Settings) -> dict[str, Any]:
    """``Blocks.launch`` keywords from the settings (host, port, share) plus the page's privacy choices."""
    return {
        "server_name": settings.gradio_server_name,
        "server_port": settings.gradio_server_port,
        "share": settings.gradio_share,
        "inbrowser": False,
        "max_file_size": settings.image_max_bytes,
        # Chats stay out of the browser's storage and out of Gradio's monitoring and MCP endpoints.
        "run_history": False,
        "enable_monitoring": False,
        "mcp_server": False,
        "footer_links": ["api", "settings"],
        "theme": theme(),
        "css": page_css(),
    }


def theme() -> gr.themes.Base:
    # System fonts: the default theme would fetch fonts from Google, which leaks every page view and fails offline.
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
    )
