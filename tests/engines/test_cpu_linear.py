"""The engine's faster CPU linear layers: oneDNN-packed weights for several rows, a single row split in blocks across
the threads; used only by the engine's thread, and close to MKL."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")

from stoker.engines.cpu_linear import CpuLinears, packed_kernels_available  # noqa: E402

pytestmark = pytest.mark.skipif(not packed_kernels_available(), reason="this torch build has no oneDNN linear")
THREADS = torch.get_num_threads()


def two_layers() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.SiLU(), torch.nn.Linear(512, 256, bias=False)).eval()


def test_packed_only_inside_active_and_for_several_rows(monkeypatch) -> None:
    model = two_layers()
    reference = two_layers()  # the same seeded weights, never packed
    torch.set_num_threads(1)  # one thread: a single row has nothing to split (tested below)
    try:
        packed = CpuLinears.install(model, "packed")
    finally:
        torch.set_num_threads(THREADS)
    assert packed is not None and packed.layers == 2 and packed.blocks == 1
    calls: list[int] = []
    real = torch.ops.mkldnn._linear_pointwise

    def counting(x, *args):
        calls.append(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counting)
    rows = torch.randn(5, 64 * 8)
    with torch.inference_mode():
        # Outside active(): plain F.linear, bit for bit.
        assert torch.equal(model(rows), reference(rows)) and not calls
        with packed.active():
            fast = model(rows)
            one = model(rows[:1])  # a single row keeps the stock path
            assert calls == [5, 5]
            # Two rows: 2 x 512 x 512 multiply-adds reach MIN_MACS (2^19); 2 x 512 x 256 do not.
            model(rows[:2])
        assert calls == [5, 5, 2]
        assert torch.equal(one, reference(rows[:1]))
        torch.testing.assert_close(fast, reference(rows), rtol=1e-5, atol=1e-5)

        # Another thread is outside the engine's scope even while this one is inside it.
        seen: list[torch.Tensor] = []
        with packed.active():
            worker = threading.Thread(target=lambda: seen.append(model(rows)))
            worker.start()
            worker.join()
        assert calls == [5, 5, 2] and torch.equal(seen[0], reference(rows))


def test_a_single_row_is_split_across_the_threads(monkeypatch) -> None:
    """One row (a decode step served alone) runs as one batched matmul over blocks of the weight's rows, a view of
    the weight; only inside active(), and as close to F.linear as MKL is to itself."""
    model = two_layers()
    reference = two_layers()
    torch.set_num_threads(2)
    try:
        fast = CpuLinears.install(model, "auto")
    finally:
        torch.set_num_threads(THREADS)
    assert fast is not None and fast.blocks == 2
    calls: list[tuple[int, ...]] = []
    real = torch.bmm

    def counting(a, b):
        calls.append(tuple(a.shape))
        assert a.data_ptr() in {m.weight.data_ptr() for m in model if isinstance(m, torch.nn.Linear)}  # no copy
        return real(a, b)

    monkeypatch.setattr(torch, "bmm", counting)
    row = torch.randn(1, 1, 512)
    with torch.inference_mode():
        assert torch.equal(model(row), reference(row)) and not calls  # outside active(): plain F.linear
        with fast.active():
            out = model(row)
        assert calls == [(2, 256, 512), (2, 128, 512)]
        assert out.shape == (1, 1, 256)
        torch.testing.assert_close(out, reference(row), rtol=1e-5, atol=1e-5)


def test_an_odd_width_keeps_the_stock_single_row() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 63)).eval()
    torch.set_num_threads(2)
    try:
        fast = CpuLinears.install(model, "stock"), CpuLinears.install(model, "auto")
    finally:
        torch.set_num_threads(THREADS)
    assert fast[0] is None
    row = torch.randn(1, 64)
    with torch.inference_mode(), fast[1].active():
        assert torch.equal(model(row), torch.nn.functional.linear(row, model[0].weight, model[0].bias))


def test_packing_twice_reuses_the_first_copies() -> None:
    model = two_layers()
    first = CpuLinears.install(model, "packed")
    forwards = [m.forward for m in model if isinstance(m, torch.nn.Linear)]
    second = CpuLinears.install(model, "packed")
    assert first is not None and second is not None
    assert [m.forward for m in model if isinstance(m, torch.nn.Linear)] == forwards


def test_modes() -> None:
    assert CpuLinears.install(two_layers(), "stock") is None
    assert CpuLinears.install(two_layers().double(), "auto") is None  # float32 only
    assert CpuLinears.install(two_layers(), "auto") is not None


def test_bad_cpu_matmul_value_is_a_config_error() -> None:
    from stoker.config import load_settings
    from stoker.errors import ConfigError

    with pytest.raises(ConfigError, match="cpu_matmul") as err:
        load_settings(None, {"cpu_matmul": "fast"})
    assert "packed" in err.value.message and "stock" in err.value.message


def test_linear_subclasses_with_their_own_forward_are_left_alone() -> None:
    """A MoE router (Llama4Router, PhimoeTopKRouter) subclasses nn.Linear and adds top-k and a sigmoid in its own
    forward: replacing that forward would hand the model raw logits."""

    class Router(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scores = super().forward(x)
            top = torch.topk(scores, 2, dim=-1)
            return torch.zeros_like(scores).scatter(-1, top.indices, torch.sigmoid(top.values))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), Router(1024, 512)).eval()
    reference = torch.nn.Sequential(torch.nn.Linear(512, 1024), Router(1024, 512)).eval()
    reference.load_state_dict(model.state_dict())
    packed = CpuLinears.install(model, "packed")
    assert packed is not None and packed.layers == 1  # the plain layer only
    rows = torch.randn(64, 512)
    with torch.inference_mode(), packed.active():
        out = model(rows)
    expected = reference(rows)
    assert ((out > 0).sum(-1) == 2).all()  # still the router's top-2 sigmoid scores, not raw logits
    assert torch.allclose(out, expected, atol=1e-5)
