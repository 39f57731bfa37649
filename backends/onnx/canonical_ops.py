"""Converters of moec's canonical ops other than `moe` (see `moe.py`), to opset 23 (onnxruntime 1.32 CPU runs all
of them).

- `moec.attention` → `Attention` (opset 23, 4-d GQA inputs, `is_causal=1`; a sliding window becomes a boolean
  `attn_mask` built from `Range`), then `Transpose` to moec's [B,S,H,D] layout.
- `moec.rms_norm` → `RMSNormalization` (opset 23, `stash_type=1`: float32 statistics). For non-float32 inputs
  Hugging Face rounds before the weight multiply, so those become `Cast`, `RMSNormalization` with unit scale,
  `Cast`, `Mul`.
- `moec.add_rms_norm` → `Add`, then the same as `moec.rms_norm`: two values (sum, normed), read by `getitem`.
- `moec.rope` → `RotaryEmbedding` (opset 23, non-interleaved, `position_ids = Range(seq)`) when the cos/sin operands
  are provably `[f, f]` duplicates along the last dim (traced back to `cat([f, f])`, which is what Hugging Face's
  default rotary embedding builds); otherwise the decomposed `x*cos + rotate_half(x)*sin`.
- `moec.linear` (and `aten.linear`) → `MatMul(x, Transpose(W))` (+ `Add` bias); the transpose of an initializer is
  constant-folded by onnxruntime and TensorRT.
`ExportOptions.decompose` lists canonical ops to emit as elementary ops instead (`attention`, `rms_norm` (which
covers `add_rms_norm`'s norm), `rope`), for consumers whose parser predates opset 23.
"""

from __future__ import annotations

from typing import Any

import onnx_graphsurgeon as gs
import torch
import torch.fx

from backends.onnx.context import ConversionContext, dtype_of, onnx_dtype, rank_of, value_of
from backends.onnx.converters import converter, node_arg, out_dtype
from compiler.ir import op_name


def emit_linear(ctx: ConversionContext, x: gs.Tensor, weight: gs.Tensor, bias: gs.Tensor | None) -> gs.Tensor:
    result = ctx.op("MatMul", [x, ctx.op("Transpose", [weight], {"perm": [1, 0]})])
    return ctx.op("Add", [result, bias]) if bias is not None else result


@converter("aten.linear", "moec.linear")
def _linear(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    x, weight = node.args[0], node.args[1]
    bias = node_arg(node, 2, "bias", None)
    return emit_linear(ctx, ctx.tensor(x), ctx.tensor(weight), ctx.tensor(bias) if bias is not None else None)


def _causal_mask(ctx: ConversionContext, q: gs.Tensor, sliding_window: int) -> gs.Tensor:
    """bool[S, S]: query i sees key j iff i - window < j <= i (window 0 = plain causal)."""
    seq = ctx.op("Shape", [q], {"start": 2, "end": 3})
    positions = ctx.op("Range", [ctx.const(0), ctx.op("Squeeze", [seq, ctx.ints([0])]), ctx.const(1)])
    query = ctx.op("Unsqueeze", [positions, ctx.ints([1])])
    key = ctx.op("Unsqueeze", [positions, ctx.ints([0])])
    allowed = ctx.op("LessOrEqual", [key, query])
    if sliding_window > 0:
        lower = ctx.op("Sub", [query, ctx.const(sliding_window)])
        allowed = ctx.op("And", [allowed, ctx.op("Greater", [key, lower])])
    return allowed


@converter("moec.attention", when=lambda ctx, node: "attention" not in ctx.options.decompose)
def _attention(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    q, k, v = (ctx.tensor(a) for a in node.args[:3])
    scale = node.args[3]
    sliding_window = int(node_arg(node, 4, "sliding_window", 0))
    attrs: dict[str, Any] = {"scale": float(scale)}
    inputs = [q, k, v]
    if sliding_window > 0:
        inputs.append(_causal_mask(ctx, q, sliding_window))
    else:
        attrs["is_causal"] = 1
    if out_dtype(node) != torch.float32:
        attrs["softmax_precision"] = onnx_dtype(torch.float32)
    out = ctx.op("Attention", inputs, attrs)
    return ctx.op("Transpose", [out], {"perm": [0, 2, 1, 3]})


@converter("moec.attention", when=lambda ctx, node: "attention" in ctx.options.decompose)
def _attention_decomposed(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    """softmax(q kᵀ·scale + mask) v, with k/v heads repeated to the query heads (GQA) by `Expand`."""
    q_node, k_node = node.args[0], node.args[1]
    q, k, v = (ctx.tensor(a) for a in node.args[:3])
    scale = node.args[3]
    sliding_window = int(node_arg(node, 4, "sliding_window", 0))
    dtype = out_dtype(node)
    groups = value_of(q_node).shape[1] // value_of(k_node).shape[1]
    if groups > 1:
        k, v = (repeat_heads(ctx, t, groups) for t in (k, v))
    scores = ctx.op("MatMul", [q, ctx.op("Transpose", [k], {"perm": [0, 1, 3, 2]})])
    scores = ctx.op("Mul", [ctx.cast(scores, torch.float32), ctx.scalar(float(scale), torch.float32)])
    mask = _causal_mask(ctx, q, sliding_window)
    scores = ctx.op("Where", [mask, scores, ctx.scalar(float("-inf"), torch.float32)])
    probs = ctx.cast(ctx.op("Softmax", [scores], {"axis": -1}), dtype)
    out = ctx.op("MatMul", [probs, v])
    return ctx.op("Transpose", [out], {"perm": [0, 2, 1, 3]})


def repeat_heads(ctx: ConversionContext, tensor: gs.Tensor, groups: int) -> gs.Tensor:
    """[B,H,S,D] → [B,H*groups,S,D], each head repeated `groups` times in a row (like repeat_kv)."""
    shape = ctx.op("Shape", [tensor])
    expanded = ctx.op("Unsqueeze", [tensor, ctx.ints([2])])
    ones = ctx.ints([1, 1, groups, 1, 1])
    expanded = ctx.op("Expand", [expanded, ones])
    batch_heads = ctx.op("Slice", [shape, ctx.ints([0]), ctx.ints([2]), ctx.ints([0])])
    heads = ctx.op("Mul", [ctx.op("Slice", [shape, ctx.ints([1]), ctx.ints([2]), ctx.ints([0])]), ctx.ints([groups])])
    batch = ctx.op("Slice", [batch_heads, ctx.ints([0]), ctx.ints([1]), ctx.ints([0])])
    rest = ctx.op("Slice", [shape, ctx.ints([2]), ctx.ints([4]), ctx.ints([0])])
    return ctx.op("Reshape", [expanded, ctx.op("Concat", [batch, heads, rest], {"axis": 0})])


def emit_rms_norm(
    ctx: ConversionContext, x: gs.Tensor, x_dtype: torch.dtype, weight_node: Any, eps: float, out: torch.dtype
) -> gs.Tensor:
    """`rms_norm(x, weight, eps)` of an ONNX value `x` holding `x_dtype`: opset 23's `RMSNormalization`, or elementary
    ops when `rms_norm` is in `ExportOptions.decompose`."""
    if "rms_norm" in ctx.options.decompose:
        return _rms_norm_elementary(ctx, x, x_dtype, weight_node, eps, out)
    attrs = {"axis": -1, "epsilon": float(eps), "stash_type": 1}
    if x_dtype == torch.float32 and dtype_of(weight_node) == torch.float32:
        return ctx.op("RMSNormalization", [x, ctx.tensor(weight_node)], attrs)
    hidden = value_of(weight_node).shape[0]
    unit = ctx.const([1.0] * hidden, torch.float32)
    normalized = ctx.op("RMSNormalization", [_as_float32(ctx, x, x_dtype), unit], attrs)
    return ctx.op("Mul", [ctx.cast_to(weight_node, out), ctx.cast(ctx.cast(normalized, x_dtype), out)])


def _rms_norm_elementary(
    ctx: ConversionContext, x: gs.Tensor, x_dtype: torch.dtype, weight_node: Any, eps: float, out: torch.dtype
) -> gs.Tensor:
    x32 = _as_float32(ctx, x, x_dtype)
    mean = ctx.op("ReduceMean", [ctx.op("Mul", [x32, x32]), ctx.ints([-1])], {"keepdims": 1})
    inverse = ctx.op("Reciprocal", [ctx.op("Sqrt", [ctx.op("Add", [mean, ctx.scalar(float(eps), torch.float32)])])])
    normalized = ctx.op("Mul", [x32, inverse])
    if x_dtype != torch.float32:
        normalized = ctx.cast(normalized, x_dtype)
    return ctx.op("Mul", [ctx.cast_to(weight_node, out), normalized if x_dtype == out else ctx.cast(normalized, out)])


def _as_float32(ctx: ConversionContext, x: gs.Tensor, x_dtype: torch.dtype) -> gs.Tensor:
    return x if x_dtype == torch.float32 else ctx.cast(x, torch.float32)


@converter("moec.rms_norm")
def _rms_norm(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    x_node, weight_node, eps = node.args
    return emit_rms_norm(ctx, ctx.tensor(x_node), dtype_of(x_node), weight_node, eps, out_dtype(node))


@converter("moec.add_rms_norm")
def _add_rms_norm(ctx: ConversionContext, node: torch.fx.Node) -> tuple[gs.Tensor, gs.Tensor]:
    """`Add`, then the same normalization as `moec.rms_norm`: (sum, normed), unpacked by `getitem`."""
    x_node, residual_node, weight_node, eps = node.args
    total = ctx.op("Add", [ctx.tensor(x_node), ctx.tensor(residual_node)])
    normed = emit_rms_norm(ctx, total, dtype_of(x_node), weight_node, eps, value_of(node)[1].dtype)
    return total, normed


_PASS_THROUGH = {"aten.cos", "aten.sin", "aten.mul.Tensor", "aten._to_copy", "aten.alias", "aten.unsqueeze"}


def _duplicated_halves(node: Any) -> bool:
    """True if `node`'s last dim is provably `[f, f]`: it derives elementwise from `cat([f, f], -1)`."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        name = op_name(node)
        if name == "aten.cat":
            tensors = node.args[0]
            dim = node_arg(node, 1, "dim", 0)
            return len(tensors) == 2 and tensors[0] is tensors[1] and dim in (-1, rank_of(node) - 1)
        if name not in _PASS_THROUGH:
            return False
        if name == "aten.mul.Tensor" and isinstance(node.args[1], torch.fx.Node):
            return False
        if name == "aten.unsqueeze" and node.args[1] in (-1, rank_of(node) - 1):
            return False
        node = node.args[0]
    return False


def _rotary_embedding_applies(
    ctx: ConversionContext, x: torch.fx.Node, cos: torch.fx.Node, sin: torch.fx.Node, dtype: torch.dtype
) -> bool:
    if "rope" in ctx.options.decompose:
        return False
    cos_value = value_of(cos)
    return (
        cos_value.dim() == 3
        and cos_value.shape[0] == 1
        and dtype_of(cos) == dtype_of(x) == dtype
        and _duplicated_halves(cos)
        and _duplicated_halves(sin)
    )


def emit_rope(
    ctx: ConversionContext, x_node: torch.fx.Node, cos_node: torch.fx.Node, sin_node: torch.fx.Node
) -> gs.Tensor:
    """`moec.rope(x, cos, sin)`'s lowering (see the module docstring), for the rope op and for the ops that rotate
    their operands themselves (`moec.rope_cached_attention`)."""
    dtype = torch.promote_types(dtype_of(x_node), dtype_of(cos_node))  # the rope op's result type
    if _rotary_embedding_applies(ctx, x_node, cos_node, sin_node, dtype):
        return _rotary_embedding(ctx, x_node, cos_node, sin_node)
    return _rope_elementary(ctx, x_node, cos_node, sin_node, dtype)


@converter("moec.rope")
def _rope(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    return emit_rope(ctx, *node.args)


def _rotary_embedding(
    ctx: ConversionContext, x_node: torch.fx.Node, cos_node: torch.fx.Node, sin_node: torch.fx.Node
) -> gs.Tensor:
    half = value_of(x_node).shape[-1] // 2

    def cache(arg: torch.fx.Node) -> gs.Tensor:
        rows = ctx.op("Squeeze", [ctx.tensor(arg), ctx.ints([0])])  # [S, D]: rows indexed by position
        return ctx.op("Slice", [rows, ctx.ints([0]), ctx.ints([half]), ctx.ints([1])])

    x = ctx.tensor(x_node)
    batch = ctx.op("Shape", [x], {"start": 0, "end": 1})
    seq = ctx.op("Shape", [x], {"start": 2, "end": 3})
    positions = ctx.op("Range", [ctx.const(0), ctx.op("Squeeze", [seq, ctx.ints([0])]), ctx.const(1)])
    batch_seq = ctx.op("Concat", [batch, seq], {"axis": 0})
    positions = ctx.op("Expand", [ctx.op("Unsqueeze", [positions, ctx.ints([0])]), batch_seq])
    return ctx.op("RotaryEmbedding", [x, cache(cos_node), cache(sin_node), positions], {"interleaved": 0})


def _rope_elementary(
    ctx: ConversionContext, x_node: torch.fx.Node, cos_node: torch.fx.Node, sin_node: torch.fx.Node, dtype: torch.dtype
) -> gs.Tensor:
    half = value_of(x_node).shape[-1] // 2
    x = ctx.cast_to(x_node, dtype)
    cos = ctx.op("Unsqueeze", [ctx.cast_to(cos_node, dtype), ctx.ints([1])])
    sin = ctx.op("Unsqueeze", [ctx.cast_to(sin_node, dtype), ctx.ints([1])])
    first = ctx.op("Slice", [x, ctx.ints([0]), ctx.ints([half]), ctx.ints([-1])])
    second = ctx.op("Slice", [x, ctx.ints([half]), ctx.ints([2 * half]), ctx.ints([-1])])
    rotated = ctx.op("Concat", [ctx.op("Neg", [second]), first], {"axis": -1})
    return ctx.op("Add", [ctx.op("Mul", [x, cos]), ctx.op("Mul", [rotated, sin])])
