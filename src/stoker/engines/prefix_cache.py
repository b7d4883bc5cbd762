"""Keys and values of prompt prefixes kept between requests, so that a shared system prompt or a conversation's
history is not prefilled again.

Prompts are cut into blocks of ``BLOCK`` tokens; a block is known by a hash chained through every block before it
(and the LoRA adapter, whose keys and values differ), so a block matches only after the same tokens under the same
adapter. Each stored block holds its own tokens too, checked on lookup, so a hash collision cannot hand out another
prompt's state. A request uses the longest run of cached leading blocks, never its whole prompt (the last token's
logits must be computed). At most ``max_tokens`` tokens are kept; the least recently used block goes first.

The engine places a group's cached prefixes at the start of its rows and pads between prefix and rest
(``engines.prefill``): the attention mask hides the padding and position ids count only real tokens, so the result
is the one without a cache, up to float32 rounding (the keys were computed in another batch shape).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BLOCK = 16

LayerKV = list[tuple[Any, Any]]  # per layer: keys and values [heads, tokens, head_dim]


@dataclass(frozen=True)
class _Block:
    parent: int | None
    tokens: tuple[int, ...]
    kv: LayerKV


class PrefixCache:
    """Cached blocks of prompt prefixes, with a bound on the tokens they hold."""

    def __init__(self, max_tokens: int):
        self.max_blocks = max(0, int(max_tokens)) // BLOCK
        self._blocks: OrderedDict[int, _Block] = OrderedDict()
        self.hit_tokens = 0  # prompt tokens taken from the cache, for the engine's stats

    @property
    def tokens(self) -> int:
        return len(self._blocks) * BLOCK

    def _chain(self, adapter: str, ids: list[int]) -> list[tuple[int, int | None, tuple[int, ...]]]:
        """(hash, parent hash, tokens) of each whole block of ``ids`` but the last token, which is never cached."""
        out = []
        parent: int | None = None
        digest = hash(("stoker-prefix", adapter))
        for start in range(0, len(ids) - 1 - BLOCK + 1, BLOCK):
            tokens = tuple(ids[start:start + BLOCK])
            digest = hash((digest, tokens))
            out.append((digest, parent, tokens))
            parent = digest
        return out

    def cached_blocks(self, adapter: str, ids: list[int]) -> int:
        """How many leading blocks of ``ids`` are cached."""
        count = 0
        for digest, parent, tokens in self._chain(adapter, ids):
            block = self._blocks.get(digest)
            if block is None or block.tokens != tokens or block.parent != parent:
                break
            count += 1
        return count

    def prefix(self, adapter: str, ids: list[int], blocks: int) -> LayerKV:
        """The keys and values of the first ``blocks`` blocks of ``ids`` (cached: see ``cached_blocks``), per layer
        ``[heads, blocks * BLOCK, head_dim]``; they count as recently used."""
        import torch

        digests = [digest for digest, _, _ in self._chain(adapter, ids)[:blocks]]
        chain = [self._blocks[digest] for digest in digests]
        self._touch(digests)
        self.hit_tokens += blocks * BLOCK
        layers = len(chain[0].kv)
        return [(torch.cat([b.kv[i][0] for b in chain], dim=1), torch.cat([b.kv[i][1] for b in chain], dim=1))
                for i in range(layers)]

    def store(self, adapter: str, ids: list[int], columns: Callable[[int, int], LayerKV]) -> None:
        """Keep the blocks of ``ids`` not cached yet; ``columns(start, end)`` gives the keys and values of its tokens
        ``start:end`` (copied here: the caller's buffers move on)."""
        if not self.max_blocks:
            return
        chain = self._chain(adapter, ids)[: self.max_blocks]
        for index, (digest, parent, tokens) in enumerate(chain):
            if digest not in self._blocks:
                kv = [(k.clone(), v.clone()) for k, v in columns(index * BLOCK, (index + 1) * BLOCK)]
                self._blocks[digest] = _Block(parent, tokens, kv)
        self._touch([digest for digest, _, _ in chain])
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)

    def _touch(self, digests: list[int]) -> None:
        """Mark a chain recently used, its first block last: eviction then takes the ends of chains before their
        starts (a block whose parent is gone can never match again)."""
        for digest in reversed(digests):
            self._blocks.move_to_end(digest)
