"""``stoker chat``: a terminal chat that streams replies and keeps the history.

Works the same with a TTY or piped stdin, so it can be scripted. Commands: ``clear``, ``exit`` (or EOF / Ctrl-D),
``/system TEXT``, ``/image PATH`` (vision models). Ctrl-C stops the current reply, not the program.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

from typing import TYPE_CHECKING

from stoker.config import Settings
from stoker.errors import StokerError

if TYPE_CHECKING:
    from stoker.chat import ChatService

logger = logging.getLogger("stoker")

HELP = "Commands: 'clear' resets the history, 'exit' or Ctrl-D quits, '/system TEXT' sets the system prompt"


def run_terminal_chat(settings: Settings, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    from stoker.chat import open_chat_service

    start = time.perf_counter()
    service = open_chat_service(settings)
    logger.info("model ready in %.1f s", time.perf_counter() - start)
    try:
        return TerminalChat(service, stdin or sys.stdin, stdout or sys.stdout).loop()
    finally:
        service.close()


class TerminalChat:
    def __init__(self, service: ChatService, stdin: TextIO, stdout: TextIO):
        self.service = service
        self.stdin = stdin
        self.out = stdout
        self.history: list[dict[str, Any]] = []
        self.system: str | None = None
        self.pending_images: list[Any] = []  # loaded PIL images
        self._in_reasoning = False

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def loop(self) -> int:
        vision = " '/image PATH' attaches an image," if self.service.info.vision else ""
        self.say(f"Stoker chat with {self.service.describe()}. {HELP},{vision} Ctrl-C stops a reply.")
        while True:
            self.say("User: ", end="")
            try:
                line = self.stdin.readline()
            except KeyboardInterrupt:
                self.say("\n(type exit or press Ctrl-D to quit)")
                continue
            if not line:  # EOF
                self.say()
                return 0
            text = line.rstrip("\n")
            if not self.stdin.isatty():
                self.say(text)  # piped input is not echoed by a terminal; echo it so transcripts read naturally
            command = text.strip()
            if command in ("exit", "quit", "/exit", "/quit"):
                return 0
            if command in ("clear", "/clear"):
                self.history.clear()
                self.pending_images.clear()
                self.say("History cleared.")
                continue
            if command.startswith("/system"):
                self.system = command[len("/system") :].strip() or None
                self.say(f"System prompt {'set' if self.system else 'cleared'}.")
                continue
            if command.startswith("/image"):
                self.attach_image(command[len("/image") :].strip())
                continue
            if not command:
                continue
            self.answer(text)

    def attach_image(self, path: str) -> None:
        if not self.service.info.vision:
            self.say(f"Error: the model {self.service.model_name} takes no images.")
            return
        if not path:
            self.say("Usage: /image PATH")
            return
        from stoker.media import load_image

        try:
            image = load_image(path, self.service.settings, local_ok=True)
        except StokerError as exc:
            self.say(f"Error: {exc.message}")
            return
        self.pending_images.append(image)  # loaded here: the chat service treats path strings as untrusted
        self.say(f"Image attached: {path}")

    def user_message(self, text: str) -> dict[str, Any]:
        if not self.pending_images:
            return {"role": "user", "content": text}
        parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": p}} for p in self.pending_images]
        self.pending_images = []
        return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}

    def answer(self, text: str) -> None:
        service = self.service
        params = service.sampling_params()
        system = [{"role": "system", "content": self.system}] if self.system else []
        self.history.append(self.user_message(text))
        try:
            kept, dropped = service.fit_history(system + self.history, params.max_new_tokens)
            if dropped:
                self.history = [m for m in kept if m["role"] != "system"]
                self.say(f"(history too long for the context: dropped the {dropped} oldest messages)")
            chat = service.prepare(kept, params)
        except StokerError as exc:
            self.history.pop()
            self.say(f"Error: {exc.message}")
            return
        self.say("Assistant: ", end="")
        parser = chat.parser()
        finish = "stop"
        self._in_reasoning = False
        stream = service.stream_sync(chat.request)
        try:
            for delta in stream:
                part = parser.push(delta.text)
                self.show(part.reasoning, part.content)
                if delta.finish_reason is not None:
                    finish = delta.finish_reason
        except KeyboardInterrupt:
            stream.close()
            self.say(" [stopped]", end="")
        except StokerError as exc:
            self.say(f"\nError: {exc.message}")
            self.history.pop()
            return
        rest, reply = parser.finish(finish)
        self.show(rest.reasoning, rest.content)
        self.say()
        message: dict[str, Any] = {"role": "assistant", "content": reply.content or ""}
        if reply.reasoning:
            message["reasoning_content"] = reply.reasoning
        self.history.append(message)

    def show(self, reasoning: str, content: str) -> None:
        """Reasoning as it streams, in brackets, then the answer."""
        if reasoning:
            if not self._in_reasoning:
                self.say("[thinking] ", end="")
                self._in_reasoning = True
            self.say(reasoning, end="")
        if content:
            if self._in_reasoning:
                self.say("\n[answer] ", end="")
                self._in_reasoning = False
            self.say(content, end="")
