"""Weight-only quantization: the storage layout, its arithmetic and its lazy weight rewrites, shared by the passes,
the ops' fake kernels (`compiler/ops.py`) and the backends' kernels.

Symmetric, round-to-nearest (ties to even), along the input (last) dim of a weight `[..., out, in]`:

    scale[o, g] = max |w[o, g*S : (g+1)*S]| / qmax        S = group_size, or `in` when group_size == 0
    q[o, i]     = clamp(round(w[o, i] / scale[o, i // S]), -qmax, qmax)
    w'[o, i]    = float32(q[o, i]) * float32(scale[o, i // S]), rounded to the scales' dtype

- `int8`: qmax 127; `qweight` torch.int8 `[..., out, in]`.
- `int4`: qmax 7 (the code -8 is never produced); `qweight` torch.uint8 `[..., out, in/2]`, two codes per byte,
  each code stored offset-binary (`q + 8`, in [1, 15]); byte j of a row holds column 2j in its low nibble and
  column 2j+1 in its high nibble ("low nibble first").
- `scales`: `[..., out, groups]` (groups = in / group_size, 1 per output channel when group_size == 0), in the
  dtype of the weight it was computed from (the activation dtype: float32, bfloat16 or float16). A zero row or
  group gets scale 0 and codes 0.

Why this layout (later backends convert cheaply): it is ONNX Runtime's `MatMulNBits` (bits=4) layout as is —
B `[N, K/block, block/2]` is a view of `qweight` `[N, K/2]`, low nibble first, default zero point 8, scales
`[N, K/block]` — for power-of-two groups of at least 16 (why group sizes are restricted to those). ONNX
`DequantizeLinear` with signed int4 blocks reads the same bytes after XOR 0x88 (offset binary to two's
complement per nibble); torch's `_weight_int4pack_mm` (tinygemm) takes codes in [0, 15] read as
(code - 8) * scale + zero, so ours should fit with zeros 0 once repacked by `_convert_weight_to_int4pack` (to be
checked against that kernel when the CUDA path lands); int8 per channel is `_weight_int8pack_mm`'s (`[N, K]` int8,
scales `[N]`) and TensorRT-LLM's weight-only int8 layout before its kernel-specific interleave.

The codes and the scales of one float weight are two lazy weight rewrites over it (`quantize_weight`, registered
here as the kinds `quantize` and `quantize_scales`), each computed only when a backend materializes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from compiler.weights import Rewrite, RewriteRule, Shape, WeightExpr, concat_weights, register_rewrite, stack_weights

PRECISIONS = ("int8", "int4")
QMAX = {"int8": 127, "int4": 7}
STORAGE_DTYPES = {"int8": torch.int8, "int4": torch.uint8}
INT4_OFFSET = 8
MIN_GROUP_SIZE = 16


def check_options(precision: str, group_size: int) -> None:
    """Raises ValueError unless `precision` is known and `group_size` is 0 or a power of two of at least 16."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if group_size != 0 and (group_size < MIN_GROUP_SIZE or group_size & (group_size - 1)):
        raise ValueError(
            f"group_size={group_size} must be 0 (one scale per output channel) or a power of two >= {MIN_GROUP_SIZE}"
        )


def groups_of(in_features: int, group_size: int) -> int:
    return 1 if group_size == 0 else in_features // group_size


def check_weight(shape: Sequence[int], precision: str, group_size: int) -> None:
    """Raises ValueError unless a float weight of `shape` ([..., out, in]) can be quantized this way."""
    check_options(precision, group_size)
    if len(shape) < 2:
        raise ValueError(f"only [..., out, in] weights are quantized, not a {len(shape)}-d weight")
    in_features = shape[-1]
    if group_size and in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide the input dim {in_features}")
    if precision == "int4" and in_features % 2:
        raise ValueError(f"int4 packs two columns per byte, but the input dim {in_features} is odd")


def storage_shape(shape: Sequence[int], precision: str) -> tuple[int, ...]:
    """The `qweight` shape of a float weight of `shape`."""
    in_features = shape[-1] // 2 if precision == "int4" else shape[-1]
    return (*shape[:-1], in_features)


def scales_shape(shape: Sequence[int], group_size: int) -> tuple[int, ...]:
    return (*shape[:-1], groups_of(shape[-1], group_size))


def logical_shape(
    qweight_shape: Sequence[int],
    qweight_dtype: torch.dtype,
    scales_shape_: Sequence[int],
    precision: str,
    group_size: int,
    what: str = "weight",
) -> tuple[int, ...]:
    """The float shape `[..., out, in]` a (qweight, scales) pair stands for; ValueError naming what disagrees."""
    check_options(precision, group_size)
    if qweight_dtype != STORAGE_DTYPES[precision]:
        raise ValueError(f"{what}: {precision} weights are stored as {STORAGE_DTYPES[precision]}, not {qweight_dtype}")
    shape = (*qweight_shape[:-1], qweight_shape[-1] * (2 if precision == "int4" else 1))
    check_weight(shape, precision, group_size)
    if tuple(scales_shape_) != scales_shape(shape, group_size):
        raise ValueError(
            f"{what}: scales {list(scales_shape_)} are not {list(scales_shape(shape, group_size))} for a "
            f"{precision} weight {list(shape)} with group_size={group_size}"
        )
    return shape


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], `[..., in]` -> uint8 `[..., in/2]` (offset binary, low nibble first)."""
    codes = (q.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 `[..., in/2]` -> int8 codes `[..., in]` (the inverse of `pack_int4`)."""
    low, high = packed & 0x0F, packed >> 4
    codes = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return (codes.to(torch.int16) - INT4_OFFSET).to(torch.int8)


def _grouped(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    return tensor.reshape(*tensor.shape[:-1], groups, tensor.shape[-1] // groups)


def quantize(weight: torch.Tensor, precision: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight `[..., out, in]` -> (qweight, scales) in the layout above."""
    check_weight(tuple(weight.shape), precision, group_size)
    if not weight.is_floating_point():
        raise ValueError(f"only floating-point weights are quantized, not {weight.dtype}")
    qmax = QMAX[precision]
    grouped = _grouped(weight.to(torch.float32), groups_of(weight.shape[-1], group_size))
    # Codes are computed against the scale as stored (in the weight's dtype), so that dequantizing with the stored
    # scale is the nearest representable value of each weight.
    scales = (grouped.abs().amax(dim=-1) / qmax).to(weight.dtype)
    divisor = torch.where(scales > 0, scales.to(torch.float32), torch.ones((), dtype=torch.float32))
    codes = torch.round(grouped / divisor[..., None]).clamp(-qmax, qmax).to(torch.int8).reshape(weight.shape)
    return (pack_int4(codes) if precision == "int4" else codes), scales


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, precision: str, group_size: int) -> torch.Tensor:
    """(qweight, scales) -> the float weight `[..., out, in]` they stand for, in the scales' dtype."""
    codes = unpack_int4(qweight) if precision == "int4" else qweight
    grouped = _grouped(codes.to(torch.float32), groups_of(codes.shape[-1], group_size))
    return (grouped * scales.to(torch.float32)[..., None]).reshape(codes.shape).to(scales.dtype)


# --- the lazy weight rewrites ----------------------------------------------------------------------------------


def _infer(inputs: Sequence[WeightExpr], attrs: dict[str, Any], part: str) -> tuple[Shape, torch.dtype]:
    (source,) = inputs
    if not source.dtype.is_floating_point:
        raise ValueError(f"only floating-point weights are quantized, not {source.type_str}")
    precision, group_size = attrs["precision"], attrs["group_size"]
    check_weight(source.shape, precision, group_size)
    if part == "qweight":
        return storage_shape(source.shape, precision), STORAGE_DTYPES[precision]
    return scales_shape(source.shape, group_size), source.dtype


register_rewrite(
    "quantize",
    RewriteRule(
        lambda xs, a: _infer(xs, a, "qweight"), lambda xs, a: quantize(xs[0], a["precision"], a["group_size"])[0]
    ),
)
register_rewrite(
    "quantize_scales",
    RewriteRule(
        lambda xs, a: _infer(xs, a, "scales"), lambda xs, a: quantize(xs[0], a["precision"], a["group_size"])[1]
    ),
)


def quantize_weight(expr: WeightExpr, precision: str, group_size: int) -> tuple[WeightExpr, WeightExpr]:
    """(qweight, scales) expressions of a float weight `[..., out, in]`.

    Rows are quantized independently, so a stack or concatenation on any dim but the last is quantized part by
    part: materializing then reads and quantizes one stored tensor at a time (one expert, one of w1/w3), never a
    whole float stack. Raises ValueError when the weight cannot be quantized so (e.g. the group size does not
    divide its input dim)."""
    rank = len(expr.shape)
    if isinstance(expr, Rewrite) and expr.kind in ("stack", "concat") and dict(expr.attrs)["dim"] < rank - 1:
        dim = dict(expr.attrs)["dim"]
        parts = [quantize_weight(part, precision, group_size) for part in expr.inputs]
        join = stack_weights if expr.kind == "stack" else concat_weights
        return join([q for q, _ in parts], dim), join([s for _, s in parts], dim)
    attrs = (("precision", precision), ("group_size", group_size))
    return Rewrite("quantize", (expr,), attrs), Rewrite("quantize_scales", (expr,), attrs)
