"""The running batch's KV cache: rows of different lengths, left-padded to one length.

Every row's real tokens are right-aligned, so one decode step feeds one new token per row at the same column.
Rows join by copying both sides into one new buffer, the shorter side left-padded with zeros; rows leave by
index-selecting the others away, after which columns that are padding in every row are trimmed off the left (a
view: no copy).
The 2D attention mask hides the padding; per-row position ids keep RoPE positions exact, so a row's logits do not
depend on how much padding its batch mates forced on it.

Each layer appends new keys/values in place into spare capacity (``GrowingLayer``) instead of concatenating
the whole cache every step as ``DynamicLayer`` does: that copy is O(cache) per step and per layer. Joining,
leaving and trimming keep spare capacity too, so the step after a row finishes does not reallocate the cache
(with short replies, rows come and go nearly every step).

Works with any transformers model that takes ``past_key_values`` as a ``DynamicCache`` plus 2D
``attention_mask`` and ``position_ids`` (decoder-only attention models: Llama, Qwen, Mistral, Gemma, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import DynamicCache


def new_cache() -> DynamicCache:
    """An empty cache whose layers grow in place."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = _growing_layer_class()
    return cache


_GROWING: type | None = None


def _with_headroom(length: int) -> int:
    """Capacity for a cache of ``length`` positions: room to grow for a while before the next reallocation."""
    return length + max(64, length // 2)


def _growing_layer_class() -> type:
    """``GrowingLayer``, defined on first use so that importing this module does not import transformers."""
    global _GROWING
    if _GROWING is not None:
        return _GROWING
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A ``DynamicLayer`` whose ``keys``/``values`` are views into buffers with room to grow along the sequence.

        Assigning ``keys``/``values`` (as ``PaddedKVBatch`` does on join, leave and trim) replaces the buffers; the
        next ``update`` reallocates with headroom, so a decode step costs one slice write, not a full copy.
        """

        def __init__(self, **kwargs):
            self._k = self._v = None
            self._len = 0
            super().__init__(**kwargs)

        @property
        def keys(self):
            return None if self._k is None else self._k[:, :, : self._len]

        @keys.setter
        def keys(self, value):
            self._k = value
            self._len = 0 if value is None else value.shape[-2]

        @property
        def values(self):
            return None if self._v is None else self._v[:, :, : self._len]

        @values.setter
        def values(self, value):
            self._v = value

        def lazy_initialization(self, key_states, value_states) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            new = key_states.shape[-2]
            end = self._len + new
            if self._k is None or end > self._k.shape[-2] or self._k.shape[0] != key_states.shape[0]:
                capacity = _with_headroom(end)
                keys = key_states.new_empty((*key_states.shape[:2], capacity, key_states.shape[-1]))
                values = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[-1]))
                if self._len:
                    keys[:, :, : self._len] = self._k[:, :, : self._len]
                    values[:, :, : self._len] = self._v[:, :, : self._len]
                self._k, self._v = keys, values
            self._k[:, :, self._len : end] = key_states
            self._v[:, :, self._len : end] = value_states
            self._len = end
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._len

        def batch_select_indices(self, indices) -> None:
            if self._len:
                self.keys, self.values = self.keys[indices, ...], self.values[indices, ...]

        def take_rows(self, index) -> None:
            """Keep the rows ``index`` (a long tensor), spare capacity included: one copy, no reallocation later."""
            self._k, self._v = self._k.index_select(0, index), self._v.index_select(0, index)

        def trim_left(self, cols: int) -> None:
            """Drop the first ``cols`` columns: a view of the same buffer."""
            self._k, self._v = self._k[:, :, cols:], self._v[:, :, cols:]
            self._len -= cols

        def join(self, other, pad_self: int, pad_other: int) -> None:
            """Stack ``other``'s rows under this layer's in one new buffer with spare capacity; each side is
            left-padded with zeros (finite, so that masked-out positions cannot turn attention into NaN)."""
            cols = self._len + pad_self
            rows_a, rows_b = self._k.shape[0], other._k.shape[0]
            capacity = _with_headroom(cols)
            for name in ("_k", "_v"):
                a, b = getattr(self, name), getattr(other, name)
                out = a.new_empty((rows_a + rows_b, a.shape[1], capacity, a.shape[3]))
                out[:rows_a, :, :pad_self].zero_()
                out[:rows_a, :, pad_self:cols] = a[:, :, : self._len]
                out[rows_a:, :, :pad_other].zero_()
                out[rows_a:, :, pad_other:cols] = b[:, :, : other._len]
                setattr(self, name, out)
            self._len = cols

    _GROWING = GrowingLayer
    return GrowingLayer


class PaddedKVBatch:
    """KV cache, attention mask ``[rows, cols]``, next position ``[rows]`` and last token ``[rows]``."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, last_tokens: torch.Tensor):
        self.cache = cache
        self.mask = mask
        self.positions = positions
        self.last_tokens = last_tokens

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def cols(self) -> int:
        return int(self.mask.shape[1])

    def _layers(self) -> list:
        return [layer for layer in self.cache.layers if layer.keys is not None]

    def decode_inputs(self) -> dict:
        """Model kwargs for one decode step; call ``advance`` after the forward pass."""
        import torch

        ones = torch.ones((self.rows, 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return {
            "input_ids": self.last_tokens.unsqueeze(1),
            "attention_mask": self.mask,
            "position_ids": self.positions.unsqueeze(1),
            "past_key_values": self.cache,
            "use_cache": True,
        }

    def advance(self, next_tokens: torch.Tensor) -> None:
        self.positions = self.positions + 1
        self.last_tokens = next_tokens

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order), then trim all-padding columns on the left."""
        import torch

        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        for layer in self._layers():
            layer.take_rows(index)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.last_tokens = self.last_tokens.index_select(0, index)
        self._trim()

    def _trim(self) -> None:
        if self.rows == 0:
            return
        used = self.mask.any(dim=0)
        first = int(used.to(self.mask.dtype).argmax())
        if first > 0:
            for layer in self._layers():
                layer.trim_left(first)
            self.mask = self.mask[:, first:]

    def merge(self, other: PaddedKVBatch) -> None:
        """Append ``other``'s rows after this batch's rows."""
        import torch
        import torch.nn.functional as F

        if self.rows == 0:
            self.cache, self.mask, self.positions, self.last_tokens = (
                other.cache, other.mask, other.positions, other.last_tokens)
            return
        cols = max(self.cols, other.cols)
        mine, theirs = self._layers(), other._layers()
        if len(mine) != len(theirs):
            raise RuntimeError(f"cache layer count differs ({len(mine)} vs {len(theirs)})")
        pad_a, pad_b = cols - self.cols, cols - other.cols
        for a, b in zip(mine, theirs):
            a.join(b, pad_a, pad_b)
        self.mask = torch.cat([F.pad(self.mask, (pad_a, 0)), F.pad(other.mask, (pad_b, 0))], dim=0)
        self.positions = torch.cat([self.positions, other.positions])
        self.last_tokens = torch.cat([self.last_tokens, other.last_tokens])
