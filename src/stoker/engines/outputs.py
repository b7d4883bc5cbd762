"""One choice's output as it grows token by token: text, stops, finish reason and the deltas to send.

Both backends feed each generated token through ``ChoiceOutput.push``, so they emit the same text, token ids and
finish reasons for the same tokens:
- a stop token ends the choice; it is counted and returned as an id, but its text is never shown;
- a stop string ends the choice at the token that completes it; the text is cut before it;
- reaching ``max_new`` tokens ends it with ``length``, after releasing any text held back.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from stoker.engines.base import Delta, FinishReason, TokenLogprob
from stoker.engines.detokenize import IncrementalDetokenizer
from stoker.engines.stops import StopStringMatcher


@dataclass(eq=False)
class ChoiceOutput:
    index: int  # the choice's index within its request
    prompt_tokens: int
    max_new: int
    stop_ids: Collection[int]
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    with_logprobs: bool = False
    min_tokens: int = 0  # stop strings do not count before this many tokens (stop ids are masked until then)
    output_ids: list[int] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)  # generated, not yet sent (their text is held back)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: FinishReason | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # sent once, with the first delta

    def push(self, token: int, logprob: TokenLogprob | None = None) -> Delta | None:
        """Take one generated token; return a delta when there is news (text, or the end)."""
        self.output_ids.append(token)
        self.pending_ids.append(token)
        if logprob is not None and self.with_logprobs:
            self.pending_logprobs.append(logprob)
        if token in self.stop_ids:
            return self.close("stop")
        text, stopped = self.detok.push([token]), False
        if len(self.output_ids) > self.min_tokens:
            text, stopped = self.stops.push(text)
        if stopped:
            self.finish = "stop"
        elif len(self.output_ids) >= self.max_new:
            tail = self.close("length")
            tail.text = text + tail.text
            return tail
        if self.finish is None and not text:
            return None
        return self._delta(text)

    def close(self, finish: FinishReason) -> Delta:
        """End the choice: release the text held back (unless it completes a stop string) in a final delta."""
        text, stopped = self.stops.push(self.detok.flush())
        if stopped:
            finish = "stop"
        else:
            text += self.stops.flush()
        self.finish = finish
        return self._delta(text)

    def _delta(self, text: str) -> Delta:
        delta = Delta(
            index=self.index,
            text=text,
            token_ids=self.pending_ids,
            logprobs=self.pending_logprobs if self.with_logprobs else None,
            finish_reason=self.finish,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.output_ids) if self.finish else 0,
            prompt_logprobs=self.prompt_logprobs,
        )
        self.pending_ids, self.pending_logprobs, self.prompt_logprobs = [], [], None
        return delta
