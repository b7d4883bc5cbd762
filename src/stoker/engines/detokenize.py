"""Incremental detokenization: token ids in, text deltas out, never splitting a character.

Decoding one token at a time is wrong for two reasons. Byte-level BPE and sentencepiece byte-fallback emit a
multi-byte UTF-8 character over several tokens, so a lone token decodes to U+FFFD. And sentencepiece decoders strip
the leading space of the first token they see, so ``decode([tok])`` loses the space that ``decode(prev + [tok])``
keeps. Both are solved by decoding a short sliding window: the text of the window minus the text of its already
emitted head is the new text, and it is released only when it does not end in an incomplete character.

Pure tokenizer logic, no torch: the vLLM engine reuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as left context, so the first generated token decodes with its leading space.
PROMPT_CONTEXT_TOKENS = 6


def decode(tokenizer: Any, ids: Sequence[int], skip_special_tokens: bool) -> str:
    """Decode without the WordPiece space clean-up, which would rewrite text already streamed."""
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    """Text deltas for one growing sequence of generated token ids.

    ``push(ids)`` returns the text those ids complete (maybe ""); ``flush()`` returns whatever is still held back
    (an incomplete character at the very end decodes to U+FFFD then). The concatenation of all deltas equals
    ``decode(context + generated)[len(decode(context)):]``, where context is the tail of the prompt.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        # The window decoded each time is ids[_head:]; ids[_head:_emitted] is text already emitted, kept as context.
        self._head = 0
        self._emitted = len(self._ids)
        self._head_text = self._decode(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return decode(self._tokenizer, ids, self._skip)

    def push(self, ids: Sequence[int]) -> str:
        self._ids.extend(ids)
        text = self._decode(self._ids[self._head :])
        if text.endswith(REPLACEMENT_CHAR) or len(text) <= len(self._head_text):
            return ""  # incomplete character, or only skipped special tokens so far: wait for more ids
        return self._release(text)

    def flush(self) -> str:
        """Release held-back text at the end of a sequence, even if it ends in an incomplete character."""
        if self._emitted == len(self._ids):
            return ""
        text = self._decode(self._ids[self._head :])
        if len(text) <= len(self._head_text):
            self._emitted = len(self._ids)
            return ""
        return self._release(text)

    def _release(self, text: str) -> str:
        new = text[len(self._head_text) :]
        # Slide the window: the ids just released become the context for the next ones.
        self._head, self._emitted = self._emitted, len(self._ids)
        self._head_text = self._decode(self._ids[self._head : self._emitted])
        # Keep the id list short; only the window is ever decoded again.
        if self._head > 64:
            del self._ids[: self._head]
            self._emitted -= self._head
            self._head = 0
        return new


class TokenTexts:
    """The text one token adds in context (``" the"``, not ``"the"`` or ``"Ġthe"``), cached per id.

    Used for logprobs. A token decodes after a fixed anchor token so sentencepiece keeps its leading space; a token
    that is only part of a UTF-8 character shows as U+FFFD.
    """

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        anchor = tokenizer.encode("a", add_special_tokens=False)
        self._anchor = anchor[-1:] if anchor else []
        self._anchor_text = decode(tokenizer, self._anchor, False)
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            full = decode(self._tokenizer, [*self._anchor, token_id], False)
            text = full[len(self._anchor_text) :] if full.startswith(self._anchor_text) else full
            self._cache[token_id] = text
        return text
