"""Stop strings over streamed text: cut before the first stop string, never emit any part of it.

Text arrives in deltas, and a stop string can straddle two of them, so the tail of the text that could still grow
into a stop string is held back until the next delta settles it. Pure string logic: the vLLM engine reuses it.
"""

from __future__ import annotations

from collections.abc import Sequence


def held_tail(text: str, markers: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some marker: text that may still grow into
    one, and so must wait for the next delta before it is shown."""
    longest = max((len(m) for m in markers), default=0)
    for size in range(min(len(text), longest - 1), 0, -1):
        tail = text[-size:]
        if any(m.startswith(tail) for m in markers):
            return size
    return 0


class StopStringMatcher:
    """Feeds text deltas through a set of stop strings.

    ``push(text)`` returns ``(safe_text, stopped)``: ``safe_text`` can be emitted now; when ``stopped`` is true it is
    the text up to (not including) the earliest stop string and the choice is over. ``flush()`` releases the held
    tail when the choice ends for another reason.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self._held = ""

    def __bool__(self) -> bool:
        return bool(self.stops)

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buffer = self._held + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buffer[:cut], True
        keep = held_tail(buffer, self.stops)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
