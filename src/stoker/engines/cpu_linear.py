"""oneDNN matmuls with prepacked weights for the engine's own forward passes on CPU.

Why: torch runs float32 ``nn.Linear`` on CPU through MKL, which on AMD processors does not take its AVX-512 path.
oneDNN with a weight packed once for its kernels does. Measured on this project's 2-core AMD EPYC machine, one
thread, rows x (in -> out):

| shape | MKL | packed oneDNN |
|---|---|---|
| 1 x (768 -> 2304) | 94 us | 89 us |
| 8 x (768 -> 2304) | 465 us | 149 us |
| 64 x (768 -> 2304) | 2271 us | 967 us |
| 256 x (256 -> 384), a prefill of the demo model | 502 us | 232 us |

The packed call has a fixed cost of about 10 us, so small matmuls lose. Measured MKL time / packed time, one
thread, by rows M:

| layer | M=2 | M=8 | M=64 | M=480 |
|---|---|---|---|---|
| 64 -> 64 | 0.18 | 0.22 | 0.52 | 1.51 |
| 256 -> 256 | 0.53 | 0.96 | 1.84 | 2.25 |
| 512 -> 512 | 1.08 | 1.93 | 2.16 | 2.32 |

The break-even sits near 2^19 multiply-adds (rows x in x out) for every shape measured, so that is the rule; one-row
inputs always keep the stock path, so a request served alone runs exactly the code plain transformers runs.

How: each ``nn.Linear`` of the model (those whose ``forward`` is ``nn.Linear``'s own) keeps its weight and gains a packed copy; its ``forward`` is replaced by one
that takes the packed copy only while the calling thread is inside ``PackedLinears.active()`` (the engine's step
thread, around its forward passes) and the matmul is big enough (``MIN_ROWS`` rows and ``MIN_MACS``). Every other
caller of the same model object (``model.generate`` in user code, peft, a baseline in a benchmark) still gets plain
``F.linear``. The results differ from MKL's in the last bits of float32, as MKL's own results do between batch sizes.

The packed copies cost as much memory as the linear weights, so ``auto`` packs only float32 CPU models whose
linear weights take at most ``AUTO_MAX_BYTES``; ``cpu_matmul: packed`` packs any size, ``stock`` never.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger("stoker")

MIN_ROWS = 2
MIN_MACS = 1 << 19
AUTO_MAX_BYTES = 2 * 1024**3

_state = threading.local()
_PACKED = "_stoker_packed_weight"


def packed_kernels_available() -> bool:
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ones(2, 2)
        out = torch.ops.mkldnn._linear_pointwise(
            torch.ones(2, 2), torch.ops.mkldnn._reorder_linear_weight(weight, None), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return bool((out == 2).all())


class PackedLinears:
    """The packed copies of one model's linear layers; see the module docstring."""

    def __init__(self, layers: int):
        self.layers = layers

    @staticmethod
    def install(model: Any, mode: str = "auto") -> PackedLinears | None:
        """Pack ``model``'s float32 CPU linear layers; None when ``mode`` or the model rules it out."""
        import torch

        if mode == "stock":
            return None
        # Only layers that compute exactly F.linear: a subclass with a forward of its own (a MoE router that applies
        # top-k and a sigmoid, a quantized linear) would lose what its forward adds.
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
                   and type(m).forward is torch.nn.Linear.forward
                   and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
        if not linears or not packed_kernels_available():
            if mode == "packed":
                logger.warning("cpu_matmul: packed needs torch with oneDNN on a CPU model in float32; using stock")
            return None
        size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
        if mode == "auto" and size > AUTO_MAX_BYTES:
            logger.info("cpu_matmul auto: %.1f GiB of linear weights is too much to pack twice; using stock",
                        size / 1024**3)
            return None
        for module in linears:
            if not hasattr(module, _PACKED):  # a second engine on the same model reuses the first one's copies
                _pack(module)
        return PackedLinears(len(linears))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        before = getattr(_state, "on", False)
        _state.on = True
        try:
            yield
        finally:
            _state.on = before


def _pack(module: Any) -> None:
    import torch

    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
    bias = module.bias.detach() if module.bias is not None else None  # packed once, like the weight
    plain = module.forward
    min_rows = max(MIN_ROWS, -(-MIN_MACS // module.weight.numel()))

    def forward(x: torch.Tensor) -> torch.Tensor:
        if getattr(_state, "on", False) and x.numel() >= min_rows * x.shape[-1] and x.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return plain(x)

    module.forward = forward
    setattr(module, _PACKED, packed)
