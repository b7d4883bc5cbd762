"""Faster float32 linear layers for the engine's own forward passes on CPU: prepacked oneDNN weights for several
rows, and a single row split across the threads.

Why: torch runs float32 ``nn.Linear`` on CPU through MKL, which on AMD processors does not take its AVX-512 path for
matrices, and which runs a single row (a matrix-vector product: every decode step of a request served alone) on
one thread for the sizes of small models.

**Several rows: oneDNN with a weight packed once for its kernels.** Measured on this project's 2-core AMD EPYC
machine, one thread, rows x (in -> out):

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

The break-even sits near 2^19 multiply-adds (rows x in x out) for every shape measured, so that is the rule.

**One row: the weight's rows in as many blocks as threads, one batched matmul.** ``W.view(P, out / P, in)`` is a
view of the weight, so this costs no memory; ``torch.bmm`` gives each thread one block, where MKL's own
matrix-vector product stays on one thread. Weights read per second (GB/s), 2 threads, each layer read from memory
(not cache), as a decode step reads them; SmolLM2-135M's shapes:

| in -> out | MKL `F.linear` | blocks of rows |
|---|---|---|
| 576 -> 1536 (gate, up) | 10.7 | 22.4 |
| 1536 -> 576 (down) | 15.6 | 24.2 |
| 576 -> 576 (q, o) | 10.5 | 17.3 |
| 576 -> 192 (k, v) | 9.0 | 14.3 |
| 576 -> 49152 (lm_head) | 9.8 | 19.2 |

The same machine sums a 512 MB tensor at 28 GB/s on 2 threads, so blocks come close to the memory's speed. With
one thread there is nothing to split and the stock path stays.

How: each ``nn.Linear`` of the model (those whose ``forward`` is ``nn.Linear``'s own) gets a ``forward`` that takes
these paths only while the calling thread is inside ``CpuLinears.active()`` (the engine's step thread, around its
forward passes); every other caller of the same model object (``model.generate`` in user code, peft, a baseline in
a benchmark) still gets plain ``F.linear``. The results differ from MKL's in the last bits of float32 (the sums run
in another order), as MKL's own results do between batch sizes; greedy outputs in the test suite are identical.

The packed copies cost as much memory as the linear weights, so ``auto`` packs only float32 CPU models whose
linear weights take at most ``AUTO_MAX_BYTES`` (the single-row blocks are views, so they apply at any size);
``cpu_matmul: packed`` packs any size, ``stock`` uses neither path.

``int8`` and ``int4`` (opt-in, reduced precision) also quantize each layer's weight in place (``engines.cpu_quant``):
calls of up to ``QUANT_MAX_ROWS`` rows read the integers, larger ones take the paths above on the float32 values of
the same quantized weights.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from stoker.errors import ConfigError

logger = logging.getLogger("stoker")

MIN_ROWS = 2
MIN_MACS = 1 << 19
AUTO_MAX_BYTES = 2 * 1024**3

_state = threading.local()
_FAST = "_stoker_fast_linear"  # the cpu_matmul mode a layer was installed for
_QUANT = "_stoker_quant_weight"  # a layer's cpu_quant.QuantWeight
QUANT_BITS = {"int8": 8, "int4": 4}
# Layers the quantized modes leave in float32: LoRA's small A and B matrices, and a vision model's image encoder and
# projector (their calls have many rows, and the accuracy check covers the language model only).
KEEP_FLOAT = ("lora_", "vision", "visual", "projector")
# Calls of at most this many rows (decode steps of small batches) take the int8 / int4 kernels. They win while
# reading the weight dominates: on SmolLM2's shapes, 2 threads, 576 -> 1536 takes 168 us in int8 at 2 rows where
# packed float32 takes 242, the two meet near 4 to 6 rows, and at 16 rows float32 wins (383 us, int8 502).
QUANT_MAX_ROWS = 4


def quantized_weight(module: Any) -> Any:
    """The ``cpu_quant.QuantWeight`` a layer's small calls read, or None."""
    return getattr(module, _QUANT, None)


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


class CpuLinears:
    """The faster paths of one model's linear layers; see the module docstring."""

    def __init__(self, layers: int, packed: bool, blocks: int, bits: int | None = None):
        self.layers = layers
        self.packed = packed  # several rows run on oneDNN with packed weights
        self.blocks = blocks  # a single row is split into this many blocks (1: stock)
        self.bits = bits  # int8 / int4 weights for calls of up to QUANT_MAX_ROWS rows (None: float32 only)

    @staticmethod
    def install(model: Any, mode: str = "auto") -> CpuLinears | None:
        """Speed up ``model``'s float32 CPU linear layers; None when ``mode`` or the model rules it out.

        ``int8`` and ``int4`` quantize the weights in place (``engines.cpu_quant``) and raise ``ConfigError`` for a
        model they cannot quantize: the user asked for them by name."""
        import torch

        if mode == "stock":
            return None
        bits = QUANT_BITS.get(mode)
        # Only layers that compute exactly F.linear: a subclass with a forward of its own (a MoE router that applies
        # top-k and a sigmoid, a quantized linear) would lose what its forward adds.
        named = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                 and type(m).forward is torch.nn.Linear.forward
                 and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
        linears = [m for _, m in named]
        if bits and not linears:
            raise ConfigError(f"cpu_matmul: {mode} quantizes the float32 linear layers of a model on CPU, and this "
                              "model has none (another dtype or device, or quantized already): use cpu_matmul: auto, "
                              "or load the model in float32 on CPU (infer_dtype: float32).", param="cpu_matmul")
        pack = bool(linears) and packed_kernels_available()
        if not pack and mode == "packed":
            logger.warning("cpu_matmul: packed needs torch with oneDNN on a CPU model in float32; using stock")
        size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
        if pack and mode != "packed" and size > AUTO_MAX_BYTES:
            logger.info("cpu_matmul %s: %.1f GiB of linear weights is too much to pack twice; packing none", mode,
                        size / 1024**3)
            pack = False
        blocks = torch.get_num_threads()
        if not linears or (not pack and blocks < 2 and not bits):
            return None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        quantized = 0
        for name, module in named:
            installed = getattr(module, _FAST, None)
            if installed is not None:  # a second engine on the same model reuses the first one's forwards
                if installed != mode:
                    raise ConfigError(f"this model's linear layers already run cpu_matmul: {installed} for another "
                                      f"engine, so cannot take {mode}; load the model again", param="cpu_matmul")
                continue
            # The output layer keeps 8 bits, as GGUF's Q4 files keep it.
            layer_bits = None if not bits or any(part in name for part in KEEP_FLOAT) else (
                8 if module is head else bits)
            quantized += _install(module, pack, blocks, mode, layer_bits)
        if bits:
            logger.info("cpu_matmul %s: %d of %d linear layers quantized", mode, quantized, len(linears))
        return CpuLinears(len(linears), pack, blocks, bits)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        before = getattr(_state, "on", False)
        _state.on = True
        try:
            yield
        finally:
            _state.on = before


def _install(module: Any, pack: bool, threads: int, mode: str, bits: int | None) -> bool:
    """Give ``module`` the engine's forward; True when its weight was quantized."""
    import torch

    out_features, in_features = module.weight.shape
    quant = None
    if bits and in_features % 8 == 0:  # the int8 kernel reads rows in steps of 8 (a wrong answer otherwise)
        from stoker.engines.cpu_quant import quantize

        with torch.no_grad():
            quant, weight = quantize(module.weight.detach(), bits)
            # The float32 paths (many rows) compute with the weights the quantized kernels read.
            module.weight.copy_(weight)
    packed = None
    if pack:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
    bias = module.bias.detach() if module.bias is not None else None  # packed once, like the weight
    plain = module.forward
    min_rows = max(MIN_ROWS, -(-MIN_MACS // module.weight.numel()))
    # The most blocks, up to one per thread, that split the weight's rows evenly.
    blocks = next((b for b in range(threads, 1, -1) if out_features % b == 0), 1)
    if not module.weight.is_contiguous():
        blocks = 1

    def forward(x: torch.Tensor) -> torch.Tensor:
        if getattr(_state, "on", False) and x.dtype == torch.float32:
            rows = x.numel() // in_features
            if quant is not None and rows <= QUANT_MAX_ROWS:
                y = quant.matmul(x.reshape(rows, in_features)).view(*x.shape[:-1], out_features)
                return y if bias is None else y + bias
            if rows == 1 and blocks > 1:
                # The weight is read each call, not captured: an adapter merged later changes it in place.
                column = x.reshape(1, in_features).t().expand(blocks, in_features, 1)
                y = torch.bmm(module.weight.view(blocks, out_features // blocks, in_features), column)
                y = y.view(*x.shape[:-1], out_features)
                return y if bias is None else y + bias
            if packed is not None and rows >= min_rows:
                return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return plain(x)

    module.forward = forward
    setattr(module, _FAST, mode)
    if quant is not None:
        setattr(module, _QUANT, quant)
    return quant is not None
