"""How the transformers engine prefills admitted requests: which of them go in one forward pass, and in how many
passes a group's prompts go.

A prefill on CPU is compute-bound (SmolLM2-135M in float32 on 2 cores: about 300 prompt tokens/s), so prefilling a
whole burst in one pass would stall every running stream for all of it, and no newcomer would see a token before the
last one is prefilled. The engine therefore prefills one group of at most ``max_tokens`` padded prompt tokens per
loop iteration, with a decode step of the running rows between groups, and a prompt longer than that on its own in
chunks of columns, one per iteration, each appending to the group's own cache as a decode step appends to the
running one (``bench/bench_burst.py`` measures both).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from stoker.engines.prefix_cache import BLOCK, PrefixCache

# 256 tokens keep a running stream's stall under a second on CPU; a GPU prefills thousands in milliseconds.
CPU_PREFILL_TOKENS = 256
GPU_PREFILL_TOKENS = 8192


def next_group(admitted: deque, max_tokens: int) -> list:
    """Pop the next requests to prefill together: consecutive ones whose padded size (rows x longest prompt) stays
    within ``max_tokens``. A request that wants its prompt's logprobs keeps the logits of every position (prompt x
    vocabulary floats), so it is prefilled alone and the others keep only their last position's."""
    group: list = []
    width = 0
    while admitted:
        req = admitted[0]
        scored = req.params.prompt_logprobs is not None
        new_width = max(width, len(req.prompt_ids))
        if group and (scored or new_width * (len(group) + 1) > max_tokens):
            break
        group.append(admitted.popleft())
        width = new_width
        if scored:
            break
    return group


@dataclass(eq=False)
class Prefill:
    """A group's prefill, which may take several forward passes (chunks of ``step`` columns)."""

    group: list  # the engine's requests
    rows: list  # one request per KV row (a cache that cannot copy rows has a row per choice)
    input_ids: Any  # [rows, width], left-padded
    mask: Any
    positions: Any
    cache: Any
    step: int  # columns per forward pass
    extra: dict[str, Any]  # a vision model's inputs, for the first pass
    offsets: Any  # multimodal RoPE shifts, or None
    every: bool  # keep every position's logits (prompt logprobs)
    done: int = 0  # columns prefilled so far (a cached prefix counts)
    cached: int = 0  # leading tokens of every row that came from the prefix cache
    plain: bool = False  # text rows on a plain KV cache: chunks and the prefix cache apply

    @property
    def finished(self) -> bool:
        return self.done == self.input_ids.shape[1]

    def next_inputs(self) -> dict[str, Any]:
        """The forward kwargs of the next pass (one chunk of columns), and the columns count as prefilled."""
        end = min(self.input_ids.shape[1], self.done + self.step)
        inputs = {"input_ids": self.input_ids[:, self.done:end], "attention_mask": self.mask[:, :end],
                  "position_ids": self.positions[:, self.done:end], "past_key_values": self.cache,
                  "use_cache": True, **(self.extra if self.done == 0 else {})}
        self.done = end
        return inputs


def plan(group: list, rows: list, *, model: Any, device: Any, caches: Any, max_tokens: int,
         prefixes: PrefixCache | None = None) -> Prefill:
    """Lay the rows' prompts out as one batch and decide its passes. ``caches``: the engine's
    ``kv_batch.CacheRecipe``; ``prefixes``: cached prompt prefixes, used when every row has one."""
    import torch

    every = group[0].params.prompt_logprobs is not None
    media = any(r.media for r in group)
    # Chunks and cached prefixes only for plain KV caches (a chunk appends to the cache as a decode step does),
    # without images (their features go in whole, and equal token ids do not mean equal pixels) or the logits of
    # every position.
    plain = caches.chunkable and not media and not every
    cached = 0  # leading tokens of every row taken from the prefix cache
    if plain and prefixes is not None:
        cached = min(prefixes.cached_blocks(r.adapter, r.prompt_ids) for r in rows) * BLOCK
    width = max(len(r.prompt_ids) for r in rows)
    # Left padding; with a cached prefix the padding goes between the prefix and the rest of each row.
    ids = [r.prompt_ids[:cached] + [0] * (width - len(r.prompt_ids)) + r.prompt_ids[cached:] for r in rows]
    mask_rows = [[1] * cached + [0] * (width - len(r.prompt_ids)) + [1] * (len(r.prompt_ids) - cached) for r in rows]
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)
    mask = torch.tensor(mask_rows, dtype=torch.long, device=device)
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    extra: dict[str, Any] = {}
    offsets = None
    if media:
        from stoker.engines.hf_media import prefill_inputs

        extra, positions, offsets = prefill_inputs(model, [r.media for r in rows], input_ids, mask, positions)
        for r in group:
            r.media = None  # the pixels are in the KV cache now
    step = width - cached
    if plain and step * len(rows) > max_tokens:
        step = max(1, max_tokens // len(rows))
    cache = caches.new()
    if cached:
        per_row = [prefixes.prefix(r.adapter, r.prompt_ids, cached // BLOCK) for r in rows]
        for layer in range(len(per_row[0])):
            keys = torch.stack([kv[layer][0] for kv in per_row])
            values = torch.stack([kv[layer][1] for kv in per_row])
            cache.update(keys, values, layer)
    return Prefill(group, rows, input_ids, mask, positions, cache, step, extra, offsets, every, done=cached,
                   cached=cached, plain=plain)


def store_prefixes(part: Prefill, prefixes: PrefixCache) -> None:
    """Keep the prompt blocks of a finished prefill (before its rows are copied for n choices or merged)."""
    if not part.plain:
        return
    layers = part.cache.layers
    width = part.input_ids.shape[1]
    for i, r in enumerate(part.rows):
        pad = width - len(r.prompt_ids)

        def columns(start: int, end: int, i: int = i, pad: int = pad) -> list:
            shift = 0 if start < part.cached else pad  # a cached prefix sits before the padding
            return [(layer.keys[i, :, start + shift:end + shift], layer.values[i, :, start + shift:end + shift])
                    for layer in layers]

        prefixes.store(r.adapter, r.prompt_ids, columns)
