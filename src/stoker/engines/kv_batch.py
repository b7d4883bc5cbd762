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

Hybrid and recurrent families (Qwen3.5 and Qwen3-Next's gated delta nets, Mamba layers in Jamba, Falcon-H1,
Granite 4, Nemotron-H; LFM2's short convolutions; Kimi Linear, OLMo hybrid) also keep per-row state without a
sequence dimension: a convolution window and a recurrent state per linear layer (transformers'
``LinearAttentionLayer``, which only ``DynamicCache(config=...)`` creates). Those rows join by concatenation and
leave by selection like the KV rows, with no padding and no trimming. Left padding is exact for them at prefill:
their mixers zero the padded positions and the state starts at zero, so pads leave it at zero. That holds only
without an input-projection bias, so a checkpoint with one (and DeepSeek-V4, whose compressed attention cuts its
windows on cache columns) is run by ``CacheRecipe.batchable`` = False: one request at a time.
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


# Config fields that put a bias on a recurrent mixer's input projection: the padded positions then hold the bias,
# which leaks into the convolution window and the state (batched prefill would differ from a request alone).
INPUT_BIAS_FIELDS = ("mamba_proj_bias", "use_bias", "conv_bias")


class CacheRecipe:
    """How one model's caches are made, decided once from its config: what ``new()`` returns, and whether rows of
    different lengths may share a batch (``batchable``)."""

    def __init__(self, config: object):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionCacheLayerMixin

        self.config = config
        try:
            probe = DynamicCache(config=config)
        except (KeyError, ValueError, TypeError):
            probe = None  # a layer type registered by its modeling module only (none seen so far needs that)
        layers = list(probe.layers) if probe is not None else []
        self.has_states = any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in layers)
        plain = (DynamicLayer, DynamicSlidingWindowLayer)
        unknown = [type(layer).__name__ for layer in layers
                   if not isinstance(layer, LinearAttentionCacheLayerMixin) and type(layer) not in plain]
        biased = self.has_states and any(getattr(config, f, False) is True for f in INPUT_BIAS_FIELDS)
        self.batchable = not unknown and not biased
        # A prompt may be prefilled in chunks (each appending to the cache as a decode step does): plain KV layers.
        self.chunkable = self.batchable and not self.has_states and probe is not None and all(
            type(layer) is DynamicLayer for layer in layers)
        self.why_serial = (f"its cache layers ({', '.join(sorted(set(unknown)))}) cannot hold rows of different "
                           "lengths" if unknown else "a bias on its recurrent input projection makes padding leak "
                           "into the state" if biased else "")

    def new(self) -> DynamicCache:
        """An empty cache: growing KV layers, and the model's own state layers where it has them."""
        if not self.has_states and self.batchable:
            return new_cache()
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        cache = DynamicCache(config=self.config)
        if self.batchable:
            growing = _growing_layer_class()
            cache.layers = [growing() if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) else layer
                            for layer in cache.layers]
        return cache


def select_rows(cache: DynamicCache, index: torch.Tensor) -> None:
    """Keep the rows ``index`` (repeats allowed: one prompt's rows for n choices) of every layer, KV and state."""
    for layer in cache.layers:
        _take_rows(layer, index)


def _kv(layer: object) -> bool:
    return getattr(layer, "keys", None) is not None


def _states(layer: object) -> list[dict]:
    return [d for d in (getattr(layer, "conv_states", None), getattr(layer, "recurrent_states", None)) if d]


def _take_rows(layer: object, index: torch.Tensor) -> None:
    if isinstance(layer, _growing_layer_class()):
        if layer._k is not None:
            layer.take_rows(index)
    elif _kv(layer):
        layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
    for states in _states(layer):
        for key, value in states.items():
            if value is not None:
                states[key] = value.index_select(0, index)


def _trim_left(layer: object, cols: int) -> None:
    """Drop ``cols`` all-padding columns from a layer's KV (state layers have no columns)."""
    if isinstance(layer, _growing_layer_class()):
        if layer._k is not None:
            layer.trim_left(cols)
    elif _kv(layer):
        layer.keys, layer.values = layer.keys[:, :, cols:], layer.values[:, :, cols:]


def _join(a: object, b: object, pad_a: int, pad_b: int) -> None:
    """``b``'s rows under ``a``'s: KV left-padded to one width, states concatenated."""
    import torch
    import torch.nn.functional as F

    if isinstance(a, _growing_layer_class()):
        if a._k is not None:
            a.join(b, pad_a, pad_b)
    elif _kv(a):
        a.keys = torch.cat([F.pad(a.keys, (0, 0, pad_a, 0)), F.pad(b.keys, (0, 0, pad_b, 0))], dim=0)
        a.values = torch.cat([F.pad(a.values, (0, 0, pad_a, 0)), F.pad(b.values, (0, 0, pad_b, 0))], dim=0)
    for mine, theirs in zip(_states(a), _states(b)):
        for key, value in mine.items():
            if value is not None and theirs.get(key) is not None:
                mine[key] = torch.cat([value, theirs[key]], dim=0)


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
        """The layers that hold rows: KV, recurrent or convolution state (placeholders of neither are skipped)."""
        return [layer for layer in self.cache.layers if _kv(layer) or _states(layer)]

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
            _take_rows(layer, index)
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
                _trim_left(layer, first)
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
            _join(a, b, pad_a, pad_b)
        self.mask = torch.cat([F.pad(self.mask, (pad_a, 0)), F.pad(other.mask, (pad_b, 0))], dim=0)
        self.positions = torch.cat([self.positions, other.positions])
        self.last_tokens = torch.cat([self.last_tokens, other.last_tokens])
