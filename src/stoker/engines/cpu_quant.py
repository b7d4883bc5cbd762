"""Weight-only int8 and int4 copies of a linear layer's weight, for the engine's decode steps on CPU
(``cpu_matmul: int8`` or ``int4``; ``engines.cpu_linear`` decides when they run).

Why: a request served alone reads every weight once per token, so its speed is the memory's speed divided by the
bytes of weights. Float32 reads 4 bytes a weight; these read 1 (int8) or half a byte (int4). The kernels are
PyTorch's own (``aten._weight_int8pack_mm``, ``aten._weight_int4pack_mm_for_cpu``); their fast paths take bfloat16
activations, so a quantized call rounds its input to bfloat16 and its output comes back as float32.

- **int8**: one scale per output row (symmetric, round to nearest), as int8 weight-only schemes usually do.
- **int4**: groups of ``GROUP`` (32) input columns, each with a scale and a minimum (asymmetric), which is exactly
  llama.cpp's Q4_1 block. A model dequantized from a Q4_1 GGUF file (the demo model) therefore gets its own 4-bit codes
  back; the per-group scale and offset are held in bfloat16 where GGUF holds float16. Layers whose shape the int4
  kernel cannot take fall back to int8, and so does the output layer (GGUF's Q4 files keep it at 8 bits or more).

``quantize`` also returns the float32 matrix the quantized kernel multiplies by, so the engine can put it in the
model: calls with many rows (prefills, large batches), where float32 kernels are faster, then compute with the
same weights, and only the rounding of the activations differs between the two paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GROUP = 32  # int4: input columns per scale and minimum (llama.cpp's Q4_1 block)
_INT4_TILES = 1  # the int4 packing's inner k-tiles argument on CPU


@dataclass(frozen=True)
class QuantWeight:
    """A ``[out, in]`` weight as ``bits``-bit integers with their scales, in the layout its kernel reads."""

    bits: int
    data: Any  # int8 [out, in], or the int4 kernel's packed uint8 layout
    scales: Any  # int8: bfloat16 [out]; int4: bfloat16 [in / GROUP, out, 2] (scale, zero)

    def matmul(self, x: Any) -> Any:
        """``x [rows, in]`` (float32) times the weight's transpose, as float32 ``[rows, out]``."""
        import torch

        xb = x.to(torch.bfloat16)
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(xb, self.data, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.data, GROUP, self.scales)
        return y.float()


def quantize(weight: Any, bits: int) -> tuple[QuantWeight, Any]:
    """``weight`` (float32 ``[out, in]``) in ``bits`` (8 or 4), and the float32 weight that stands for; int4 falls
    back to int8 for a shape it cannot take."""
    if bits == 4:
        packed = _int4(weight)
        if packed is not None:
            return packed
    return _int8(weight)


def _int8(weight: Any) -> tuple[QuantWeight, Any]:
    import torch

    scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12)
    codes = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    scale = scale.to(torch.bfloat16)
    return QuantWeight(8, codes, scale), codes.float() * scale.float()[:, None]


def _int4(weight: Any) -> tuple[QuantWeight, Any] | None:
    import torch

    out_features, in_features = weight.shape
    if in_features % GROUP or out_features % 16:
        return None
    groups = weight.reshape(out_features, in_features // GROUP, GROUP)
    low = groups.amin(dim=-1, keepdim=True)
    scale = ((groups.amax(dim=-1, keepdim=True) - low) / 15).clamp(min=1e-12)
    codes = torch.round((groups - low) / scale).clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
    try:
        data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, _INT4_TILES)
    except (RuntimeError, AttributeError):
        return None
    # The kernel computes (code - 8) * scale + zero, so the group's minimum moves to zero = minimum + 8 * scale.
    scale, zero = scale.to(torch.bfloat16), (low + 8 * scale).to(torch.bfloat16)
    scales = torch.stack([scale.reshape(out_features, -1).t(), zero.reshape(out_features, -1).t()], dim=-1)
    weight = ((codes.reshape(groups.shape) - 8) * scale.float() + zero.float()).reshape(out_features, in_features)
    return QuantWeight(4, data, scales.contiguous()), weight
