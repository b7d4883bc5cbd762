"""``stoker chat``: a terminal chat that streams replies and keeps the history.

At a terminal, input has line editing and a history kept across sessions (the standard library's ``readline``), role
labels are coloured, replies are drawn as Markdown as they stream (``rich``; code highlighted, reasoning dim), and
each reply ends with a status line (tokens, tokens/s). Piped, the same
chat reads one message per line and writes plain text, so it can be scripted. Slash commands (``/help`` lists them)
never reach the model; ``//text`` sends ``/text``. Ctrl-C stops the current reply, not the program.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from stoker.config import Settings
from stoker.errors import StokerError

if TYPE_CHECKING:
    from stoker.chat import ChatService

logger = logging.getLogger("stoker")

HISTORY_LINES = 1000
# The sampling keys /set changes, with their types.
SETTABLE: dict[str, type] = {"temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int,
                             "repetition_penalty": float, "seed": int}
COMMANDS_HELP = """\
/help                 this list
/clear                forget the conversation (also: clear)
/system TEXT          set the system prompt; /system alone clears it
/image PATH           attach an image to the next message (vision models)
/video PATH           attach a video to the next message (Qwen-VL models)
/retry                answer the last message again
/set KEY VALUE        change a sampling key: temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed
/think on|off         switch a reasoning model's thinking
/reasoning show|hide  show the thinking as it streams, or only the answer
/stats                tokens and speed of the last reply, and how much of the context the chat fills
/save FILE            write the conversation as OpenAI-style JSON;  /load FILE reads one back
/exit                 quit (also: exit, Ctrl-D)
A line ending in \\ continues on the next line. //text sends /text to the model. Ctrl-C stops a reply."""


def run_terminal_chat(settings: Settings, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    from stoker.chat import open_chat_service

    start = time.perf_counter()
    service = open_chat_service(settings)
    logger.info("model ready in %.1f s", time.perf_counter() - start)
    try:
        return TerminalChat(service, stdin or sys.stdin, stdout or sys.stdout).loop()
    finally:
        service.close()


@dataclass
class Style:
    """ANSI colours at a terminal (unless NO_COLOR is set), nothing when piped."""

    on: bool

    @classmethod
    def for_stream(cls, out: TextIO) -> Style:
        return cls(bool(getattr(out, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR"))

    def _wrap(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.on and text else text

    def user(self, text: str) -> str:
        return self._wrap("1;32", text)

    def assistant(self, text: str) -> str:
        return self._wrap("1;36", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    def error(self, text: str) -> str:
        return self._wrap("31", text)


@dataclass
class ReplyStats:
    prompt_tokens: int = 0
    tokens: int = 0
    seconds: float = 0.0
    first_token_s: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class TerminalChat:
    def __init__(self, service: ChatService, stdin: TextIO, stdout: TextIO):
        self.service = service
        self.stdin = stdin
        self.out = stdout
        self.tty = bool(getattr(stdin, "isatty", lambda: False)()) and stdin is sys.stdin
        self.style = Style.for_stream(stdout)
        self.history: list[dict[str, Any]] = []
        self.system: str | None = None
        self.pending_media: list[Any] = []  # loaded PIL images and media.video.Video clips
        self.overrides: dict[str, Any] = {}  # /set
        self.thinking: bool | None = None  # /think
        self.last = ReplyStats()
        self.show_reasoning = True  # /reasoning: the model's thinking shown or not (it still thinks; see /think)
        self.commands: dict[str, Callable[[str], bool | None]] = {
            "help": self.cmd_help, "clear": self.cmd_clear, "system": self.cmd_system, "image": self.attach_image,
            "video": self.attach_video,
            "retry": self.cmd_retry, "set": self.cmd_set, "think": self.cmd_think, "stats": self.cmd_stats,
            "save": self.cmd_save, "load": self.cmd_load, "reasoning": self.cmd_reasoning,
            "exit": lambda _: True, "quit": lambda _: True,
        }

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def banner(self) -> str:
        service = self.service
        parts = [f"Stoker chat with {service.describe()}", f"template {service.template.name}"]
        if service.settings.infer_backend == "vllm":
            parts.append("vLLM")
        return f"{', '.join(parts)}. /help lists commands; exit or Ctrl-D quits, Ctrl-C stops a reply."

    # --- input ------------------------------------------------------------------------------------------------------
    def read_message(self) -> str | None:
        """One message (lines ending in a backslash continue it); None at end of input."""
        lines: list[str] = []
        while True:
            line = self._read_line(self.style.user("User: ") if not lines else "... ")
            if line is None:
                return "\n".join(lines) if lines else None
            if line.endswith("\\"):
                lines.append(line[:-1])
                continue
            lines.append(line)
            return "\n".join(lines)

    def _read_line(self, prompt: str) -> str | None:
        if self.tty:
            try:
                return input(prompt)
            except EOFError:
                return None
        self.say(prompt, end="")
        line = self.stdin.readline()
        if not line:
            return None
        text = line.rstrip("\n")
        self.say(text)  # piped input is not echoed by a terminal; echo it so transcripts read naturally
        return text

    def loop(self) -> int:
        history = _open_line_history() if self.tty else None
        try:
            self.say(self.banner())
            while True:
                try:
                    text = self.read_message()
                except KeyboardInterrupt:
                    self.say("\n(type exit or press Ctrl-D to quit)")
                    continue
                if text is None:  # EOF
                    self.say()
                    return 0
                if self.handle(text):
                    return 0
        finally:
            if history is not None:
                history()

    def handle(self, text: str) -> bool:
        """Run one line of input; True when the chat should end."""
        command = text.strip()
        if command in ("exit", "quit", "clear"):
            command = "/" + command
        if command.startswith("//"):
            return bool(self.answer(text.lstrip()[1:]))
        if command.startswith("/"):
            name, _, arg = command[1:].partition(" ")
            action = self.commands.get(name.lower())
            if action is None:
                self.say(f"Unknown command /{name}. /help lists the commands; //{name} sends it as text.")
                return False
            return bool(action(arg.strip()))
        if command:
            self.answer(text)
        return False

    # --- commands ---------------------------------------------------------------------------------------------------
    def cmd_help(self, _: str) -> None:
        extra = "" if self.service.info.vision else "\n(/image needs a vision model; this one takes text only)"
        self.say(COMMANDS_HELP + extra)

    def cmd_clear(self, _: str) -> None:
        self.history.clear()
        self.pending_media.clear()
        self.say("History cleared.")

    def cmd_system(self, arg: str) -> None:
        self.system = arg or None
        self.say(f"System prompt {'set' if self.system else 'cleared'}.")

    def cmd_retry(self, _: str) -> None:
        if self.history and self.history[-1]["role"] == "assistant":
            self.history.pop()
        if not self.history or self.history[-1]["role"] != "user":
            self.say("Nothing to retry yet.")
            return
        self.answer(None)

    def cmd_set(self, arg: str) -> None:
        key, _, value = arg.partition(" ")
        if not key:
            current = self.service.sampling_params(**self.overrides)
            self.say(", ".join(f"{k}={getattr(current, k)}"
                               for k in SETTABLE))
            return
        kind = SETTABLE.get(key)
        if kind is None:
            self.say(f"/set takes one of {', '.join(SETTABLE)}; {key!r} is not one of them.")
            return
        try:
            parsed = kind(value.strip())
        except ValueError:
            self.say(f"/set {key} needs {'an integer' if kind is int else 'a number'}, not {value.strip()!r}.")
            return
        trial = {**self.overrides, key: parsed}
        try:
            from stoker.chat import validate_params

            validate_params(self.service.sampling_params(**trial), "/set")
        except StokerError as exc:
            self.say(f"Error: {exc.message}")
            return
        self.overrides = trial
        self.say(f"{key} = {parsed}")

    def cmd_think(self, arg: str) -> None:
        if arg.lower() not in ("on", "off"):
            self.say("Usage: /think on|off")
            return
        self.thinking = arg.lower() == "on"
        if self.service.template.thinking is None:
            self.say(f"Thinking {arg.lower()} (the template {self.service.template.name} has no reasoning block, "
                     "so this changes nothing).")
        else:
            self.say(f"Thinking {arg.lower()}.")

    def cmd_reasoning(self, arg: str) -> None:
        if arg.lower() not in ("show", "hide"):
            self.say("Usage: /reasoning show|hide")
            return
        self.show_reasoning = arg.lower() == "show"
        self.say(f"Reasoning {'shown' if self.show_reasoning else 'hidden'} (the model still thinks: /think off "
                 "stops that).")

    def cmd_stats(self, _: str) -> None:
        s = self.last
        if not s.tokens:
            self.say("No reply yet.")
            return
        first = f", first token after {s.first_token_s:.2f} s" if s.first_token_s is not None else ""
        used = s.prompt_tokens + s.tokens
        limit = self.service.max_model_len
        self.say(f"Last reply: {s.tokens} tokens in {s.seconds:.2f} s ({s.tokens_per_s:.1f} tokens/s{first}). "
                 f"Context: {used} of {limit} tokens ({100 * used / limit:.0f}%).")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            self.say("Usage: /save FILE")
            return
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            _saveable(m) for m in self.history]
        path = Path(arg).expanduser()
        try:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(messages, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            tmp.replace(path)  # a crash mid-write leaves the old file, never half of one
        except OSError as exc:
            self.say(f"Error: cannot write {path}: {exc.strerror or exc}.")
            return
        self.say(f"Saved {len(messages)} messages to {path}.")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            self.say("Usage: /load FILE")
            return
        path = Path(arg).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            self.say(f"Error: cannot read {path} as a JSON conversation: {exc}.")
            return
        messages = data.get("messages") if isinstance(data, dict) else data
        problem = _conversation_problem(messages)
        if problem:
            self.say(f"Error: {path} is not a conversation: {problem}.")
            return
        self.system = next((m["content"] for m in messages if m["role"] == "system"), None)
        self.history = [m for m in messages if m["role"] != "system"]
        self.pending_media.clear()
        self.say(f"Loaded {len(self.history)} messages from {path}.")

    def attach_image(self, path: str) -> None:
        self._attach(path, "image")

    def attach_video(self, path: str) -> None:
        self._attach(path, "video")

    def _attach(self, path: str, kind: str) -> None:
        processor = self.service.processor
        takes = getattr(processor, "takes_videos", False) and self.service.info.expands_images if kind == "video" \
            else self.service.info.vision
        if not takes:
            self.say(f"Error: the model {self.service.model_name} takes no {kind}s.")
            return
        if not path:
            self.say(f"Usage: /{kind} PATH")
            return
        from stoker.media import load_image
        from stoker.media.video import load_video

        try:
            load = load_image if kind == "image" else load_video
            media = load(path, self.service.settings, local_ok=True)
        except StokerError as exc:
            self.say(f"Error: {exc.message}")
            return
        self.pending_media.append(media)  # loaded here: the chat service treats path strings as untrusted
        self.say(f"{kind.capitalize()} attached: {path}")

    # --- replies ----------------------------------------------------------------------------------------------------
    def user_message(self, text: str) -> dict[str, Any]:
        if not self.pending_media:
            return {"role": "user", "content": text}
        from stoker.media.video import Video

        parts: list[dict[str, Any]] = [
            {"type": "video_url", "video_url": {"url": m}} if isinstance(m, Video)
            else {"type": "image_url", "image_url": {"url": m}} for m in self.pending_media]
        self.pending_media = []
        return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}

    def answer(self, text: str | None) -> None:
        """Answer ``text`` (None: the last user message again, for /retry) and add the reply to the history."""
        service = self.service
        params = service.sampling_params(**self.overrides)
        system = [{"role": "system", "content": self.system}] if self.system else []
        if text is not None:
            self.history.append(self.user_message(text))
        try:
            kept, dropped = service.fit_history(system + self.history, params.max_new_tokens)
            if dropped:
                self.history = [m for m in kept if m["role"] != "system"]
                self.say(f"(history too long for the context: dropped the {dropped} oldest messages)")
            chat = service.prepare(kept, params, enable_thinking=self.thinking)
        except StokerError as exc:
            if text is not None:
                self.history.pop()
            self.say(self.style.error(f"Error: {exc.message}"))
            return
        self.say(self.style.assistant("Assistant: "), end="" if not self.style.on else "\n")
        parser = chat.parser()
        finish, tokens, first = "stop", 0, None
        view = self.view()
        started = time.perf_counter()
        stream = service.stream_sync(chat.request)
        stopped = False
        try:
            for delta in stream:
                if first is None and delta.token_ids:
                    first = time.perf_counter() - started
                tokens += len(delta.token_ids)
                part = parser.push(delta.text)
                view.add(part.reasoning, part.content)
                if delta.finish_reason is not None:
                    finish = delta.finish_reason
        except KeyboardInterrupt:
            stream.close()
            stopped = True
        except StokerError as exc:
            view.close()
            self.say(self.style.error(f"\nError: {exc.message}"))
            if text is not None:
                self.history.pop()
            return
        self.last = ReplyStats(len(chat.request.prompt_ids), tokens, time.perf_counter() - started, first)
        rest, reply = parser.finish(finish)
        view.add(rest.reasoning, rest.content)
        view.close()
        self.say(" [stopped]" if stopped else "")
        if self.style.on:  # at a terminal only: piped transcripts stay exactly the replies
            cut = " (cut at max_new_tokens)" if finish == "length" and not stopped else ""
            self.say(self.style.dim(f"[{tokens} tokens, {self.last.tokens_per_s:.1f} tokens/s{cut}]"))
        message: dict[str, Any] = {"role": "assistant", "content": reply.content or ""}
        if reply.reasoning:
            message["reasoning_content"] = reply.reasoning
        self.history.append(message)

    def view(self) -> ReplyView:
        if self.style.on:
            return RichView(self.out, show_reasoning=self.show_reasoning)
        return PlainView(self.say, self.style, show_reasoning=self.show_reasoning)


class ReplyView:
    """How a streaming reply is drawn: ``add`` each new piece of reasoning and content, then ``close``."""

    def add(self, reasoning: str, content: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class PlainView(ReplyView):
    """Text as it comes: reasoning in brackets (dim at a terminal without rich), then the answer."""

    def __init__(self, say: Callable[..., None], style: Style, *, show_reasoning: bool):
        self.say, self.style, self.show_reasoning = say, style, show_reasoning
        self.in_reasoning = False

    def add(self, reasoning: str, content: str) -> None:
        if reasoning and self.show_reasoning:
            if not self.in_reasoning:
                self.say(self.style.dim("[thinking] "), end="")
                self.in_reasoning = True
            self.say(self.style.dim(reasoning), end="")
        if content:
            if self.in_reasoning:
                self.say("\n" + self.style.dim("[answer] "), end="")
                self.in_reasoning = False
            self.say(content, end="")


class RichView(ReplyView):
    """At a terminal: the reply drawn as Markdown while it streams (code highlighted), reasoning dim above it."""

    def __init__(self, out: TextIO, *, show_reasoning: bool):
        from rich.console import Console
        from rich.live import Live

        self.console = Console(file=out, highlight=False)
        self.show_reasoning = show_reasoning
        self.reasoning, self.content = "", ""
        self.live = Live(console=self.console, refresh_per_second=12, auto_refresh=False, vertical_overflow="visible")
        self.live.start()

    def add(self, reasoning: str, content: str) -> None:
        from rich.console import Group
        from rich.markdown import Markdown
        from rich.text import Text

        self.reasoning += reasoning
        self.content += content
        parts: list[Any] = []
        if self.reasoning and self.show_reasoning:
            parts.append(Text(self.reasoning.strip(), style="dim"))
        if self.content:
            parts.append(Markdown(self.content, code_theme="monokai"))
        self.live.update(Group(*parts), refresh=True)

    def close(self) -> None:
        self.live.stop()


def _open_line_history() -> Callable[[], None] | None:
    """Line editing and a history file for ``input()``; returns the function that saves the history."""
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline: plain input still works
        return None
    from stoker.paths import cache_home

    path = cache_home() / "chat_history"
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(HISTORY_LINES)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    return save


def _saveable(message: dict[str, Any]) -> dict[str, Any]:
    """A history message as JSON: attached images and videos are loaded media, saved as a note in their place."""
    content = message.get("content")
    if isinstance(content, list):
        notes = {"image_url": "[image]", "video_url": "[video]"}
        content = [p if p.get("type") == "text" else {"type": "text", "text": notes.get(p.get("type"), "[media]")}
                   for p in content]
        message = {**message, "content": content}
    return message


def _conversation_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "expected a non-empty JSON list of messages (or {\"messages\": [...]})"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            return f"message {i} has no role system, user, assistant or tool"
    return None
