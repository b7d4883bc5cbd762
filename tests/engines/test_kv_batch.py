"""The running batch's cache: joining, leaving and trimming give exactly the rows a plain concatenation would."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from stoker.engines.kv_batch import PaddedKVBatch, new_cache  # noqa: E402


def filled(rows: int, cols: int, seed: int) -> PaddedKVBatch:
    """A one-layer cache of ``rows`` x ``cols`` positions, the first ``r`` columns of row ``r`` being padding."""
    gen = torch.Generator().manual_seed(seed)
    cache = new_cache()
    keys = torch.randn(rows, 2, cols, 4, generator=gen)
    values = torch.randn(rows, 2, cols, 4, generator=gen)
    cache.update(keys, values, 0)
    mask = torch.ones(rows, cols, dtype=torch.long)
    for r in range(rows):
        mask[r, :r] = 0
    return PaddedKVBatch(cache, mask, positions=mask.sum(-1), last_tokens=torch.arange(rows))


def visible(batch: PaddedKVBatch) -> tuple[torch.Tensor, torch.Tensor]:
    layer = batch.cache.layers[0]
    return layer.keys.clone(), layer.values.clone()


def test_join_leave_and_trim_match_plain_tensor_ops() -> None:
    a, b = filled(3, 5, seed=1), filled(2, 8, seed=2)
    (ka, va), (kb, vb) = visible(a), visible(b)
    a.merge(b)
    keys, values = visible(a)
    pad = torch.nn.functional.pad
    assert torch.equal(keys, torch.cat([pad(ka, (0, 0, 3, 0)), kb]))  # the shorter side is left-padded with zeros
    assert torch.equal(values, torch.cat([pad(va, (0, 0, 3, 0)), vb]))
    assert a.mask.tolist()[0] == [0, 0, 0, 1, 1, 1, 1, 1] and a.rows == 5 and a.cols == 8

    # The two long rows leave: the three columns that are now padding in every row are trimmed away.
    a.keep([0, 1, 2])
    keys, values = visible(a)
    assert torch.equal(keys, ka) and torch.equal(values, va) and a.cols == 5

    # A decode step writes in place into the spare capacity left by merge and keep.
    buffer = a.cache.layers[0]._k
    inputs = a.decode_inputs()
    step_k, step_v = torch.ones(3, 2, 1, 4), torch.full((3, 2, 1, 4), 2.0)
    inputs["past_key_values"].update(step_k, step_v, 0)
    keys, values = visible(a)
    assert a.cache.layers[0]._k.data_ptr() == buffer.data_ptr()
    assert torch.equal(keys, torch.cat([ka, step_k], dim=2)) and torch.equal(values, torch.cat([va, step_v], dim=2))
    assert a.cols == keys.shape[2] == 6
