"""FP8 (E4M3) post-training quantization: the format, its arithmetic and its lazy weight rewrites, shared by the
`quantize-fp8` pass, the ops' fake kernels (`compiler/ops.py`) and the backends' kernels.

Per tensor, symmetric and saturating, as TensorRT-LLM's FP8 recipe (ModelOpt `--qformat fp8`):

    scale = amax / 448                                    448: the largest finite torch.float8_e4m3fn
    q     = float8_e4m3fn(clamp(float32(t) / scale, -448, 448))        (torch's cast: round to nearest even)
    t'    = float32(q) * scale

- Weights: scales are computed from the weight itself. A linear weight `[out, in]` gets one scale (`f32[]`); the
  MoE's stacked experts get one per expert: `w13 [E, 2I, H]` -> `f32[E]`, the gate rows (w1) and up rows (w3) of
  an expert sharing one (TensorRT-LLM fuses w3/w1 into one GEMM, so they need one scale), and `w2 [E, H, I]` ->
  `f32[E]`. The codes are `float8_e4m3fn` of the weight's shape.
- Activations: one static scale per op input, from the absolute maximum `calibrate` recorded; an activation beyond
  the calibrated range saturates at ±448 * scale.
- KV caches: one static scale per layer for the keys and one for the values, from `calibrate` too.
- A zero amax (an all-zero weight, an activation that never fired) gets scale 1: zeros are exact under any scale,
  and a kernel divides by activation scales.

The codes and the scale of one float weight are two lazy weight rewrites over it (`fp8_quantize`, `fp8_scale`),
computed only when a backend materializes them. A stack of experts is quantized expert by expert: materializing
reads one expert's float weight at a time, never the whole stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from compiler.weights import (
    Rewrite,
    RewriteRule,
    Shape,
    WeightExpr,
    concat_weights,
    register_rewrite,
    select_weight,
    slice_weight,
    stack_weights,
)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_DTYPE = torch.float32


def scale_of_amax(amax: float) -> float:
    """The static scale of an activation whose calibrated absolute maximum is `amax`, as the float32 it is used as."""
    if not amax > 0:
        return 1.0
    return float(torch.tensor(amax, dtype=SCALE_DTYPE) / FP8_MAX)


def tensor_scale(tensor: torch.Tensor) -> torch.Tensor:
    """The `f32[]` scale of a whole tensor: its absolute maximum / 448 (1 for an all-zero tensor)."""
    amax = tensor.abs().amax().to(SCALE_DTYPE)
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones((), dtype=SCALE_DTYPE, device=amax.device))


def quantize(tensor: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """`tensor` -> float8_e4m3fn codes under `scale` (divided in float32, saturated to ±448)."""
    return (tensor.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(codes: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """float8_e4m3fn codes -> the float32 values they stand for under `scale`."""
    return codes.to(torch.float32) * scale


def fake_quantize(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """What an FP8 GEMM reads of an activation quantized with the static `scale`: float32 values on the FP8 grid."""
    return dequantize(quantize(tensor, scale), scale)


def quantize_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight -> (codes, `f32[]` scale) under its own per-tensor scale."""
    if not weight.is_floating_point():
        raise ValueError(f"only floating-point weights are quantized, not {weight.dtype}")
    scale = tensor_scale(weight)
    return quantize(weight, scale), scale


# --- the lazy weight rewrites ----------------------------------------------------------------------------------


def _infer(inputs: Sequence[WeightExpr], part: str) -> tuple[Shape, torch.dtype]:
    (source,) = inputs
    if not source.dtype.is_floating_point or source.dtype == FP8_DTYPE:
        raise ValueError(f"only float weights are quantized to fp8, not {source.type_str}")
    return (source.shape, FP8_DTYPE) if part == "codes" else ((), SCALE_DTYPE)


register_rewrite(
    "fp8_quantize", RewriteRule(lambda xs, a: _infer(xs, "codes"), lambda xs, a: quantize_tensor(xs[0])[0])
)
register_rewrite("fp8_scale", RewriteRule(lambda xs, a: _infer(xs, "scale"), lambda xs, a: quantize_tensor(xs[0])[1]))


def _expert(expr: WeightExpr, index: int) -> WeightExpr:
    """Expert `index` of a stacked `[E, ...]` weight, pushed through slices and concatenations on later dims (a
    rank's intermediate slice, w1 and w3 side by side) so that it reads that expert's bytes only."""
    if isinstance(expr, Rewrite):
        attrs: dict[str, Any] = dict(expr.attrs)
        if expr.kind == "slice" and attrs["dim"] == 0:
            return _expert(expr.inputs[0], attrs["start"] + index)
        if expr.kind == "slice":
            return slice_weight(_expert(expr.inputs[0], index), attrs["dim"] - 1, attrs["start"], attrs["stop"])
        if expr.kind == "concat" and attrs["dim"] > 0:
            return concat_weights([_expert(part, index) for part in expr.inputs], attrs["dim"] - 1)
    return select_weight(expr, 0, index)


def quantize_weight(expr: WeightExpr, per_expert: bool = False) -> tuple[WeightExpr, WeightExpr]:
    """(codes, scale) expressions of a float weight: one `f32[]` scale, or with `per_expert` one per expert of a
    stacked `[E, out, in]` weight (`f32[E]`). Raises ValueError for a weight that cannot be quantized so."""
    if per_expert:
        if len(expr.shape) != 3:
            raise ValueError(f"per-expert scales need a stacked [experts, out, in] weight, not {expr.type_str}")
        parts = [quantize_weight(_expert(expr, index)) for index in range(expr.shape[0])]
        return stack_weights([codes for codes, _ in parts]), stack_weights([scale for _, scale in parts])
    _infer([expr], "codes")
    return Rewrite("fp8_quantize", (expr,)), Rewrite("fp8_scale", (expr,))
