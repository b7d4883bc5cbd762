"""The reasoning format: a block the model thinks in before it answers (``<think>...</think>``).

Like a tool format, it owns both directions of its text: what closes the block in the prompt when thinking is off,
how a whole reply splits into reasoning and content, and the markers a streaming reply is watched for.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Thinking:
    """Where a reasoning block starts and ends, and what closes it in the prompt when thinking is off."""

    open: str = "<think>"
    close: str = "</think>"
    off: str = "<think>\n\n</think>\n\n"

    @property
    def markers(self) -> tuple[str, str]:
        return self.open.strip(), self.close.strip()

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning, content) the way Qwen3's template splits a reply; an unclosed block is all reasoning."""
        open_, close = self.markers
        if close in text:
            head, _, tail = text.partition(close)
            return head.rstrip("\n").split(open_)[-1].lstrip("\n"), tail.lstrip("\n")
        if open_ in text:
            head, _, tail = text.partition(open_)
            return tail.strip("\n"), head
        return None, text
