"""One converter per fx op (ATen as traced, and moec's canonical ops), registered with `@converter`.

A converter reads an fx node's arguments through the `ConversionContext` and returns the node's ONNX value (see
`context.py` for how values are represented). Arithmetic follows torch's type promotion: every operand is cast to
the dtype that `node.meta["val"]` records for the result, so `mul(f32, bool)` becomes `Mul(f32, Cast(bool))`.

Canonical ops and the ONNX they become (opset 23; onnxruntime 1.32 CPU runs all of them):
- `moec.attention` → `Attention` (opset 23, 4-d GQA inputs, `is_causal=1`; a sliding window becomes a boolean
  `attn_mask` built from `Range`), then `Transpose` to moec's [B,S,H,D] layout.
- `moec.rms_norm` → `RMSNormalization` (opset 23, `stash_type=1`: float32 statistics). For non-float32 inputs
  Hugging Face rounds before the weight multiply, so those become `Cast`, `RMSNormalization` with unit scale,
  `Cast`, `Mul`.
- `moec.rope` → `RotaryEmbedding` (opset 23, non-interleaved, `position_ids = Range(seq)`) when the cos/sin operands
  are provably `[f, f]` duplicates along the last dim (traced back to `cat([f, f])`, which is what Hugging Face's
  default rotary embedding builds); otherwise the decomposed `x*cos + rotate_half(x)*sin`.
- `moec.linear` → `MatMul(x, Transpose(W))` (+ `Add` bias); the transpose of an initializer is constant-folded by
  onnxruntime and TensorRT.
- `moec.moe` → see `moe.py` (three modes).
`aten.ge`/`lt`/`logical_and`/`where` (`shard`'s vocabulary-parallel embedding) become `GreaterOrEqual`/`Less`/
`And`/`Where`.
`ExportOptions.decompose` lists canonical ops to emit as elementary ops instead (`attention`, `rms_norm`,
`rope`), for consumers whose parser predates opset 23.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import torch
import torch.fx

from backends.onnx.context import (
    NUMPY_DTYPES,
    ConversionContext,
    OnnxExportError,
    dtype_of,
    onnx_dtype,
    rank_of,
    value_of,
)
from compiler.ir import op_name

Converter = Callable[[ConversionContext, torch.fx.Node], Any]
Predicate = Callable[[ConversionContext, torch.fx.Node], bool]

_CONVERTERS: dict[str, list[tuple[Predicate | None, Converter]]] = {}


def converter(*names: str, when: Predicate | None = None) -> Callable[[Converter], Converter]:
    """Registers `fn` for the ops `names` (as `compiler.ir.op_name` prints them), optionally only `when`."""

    def register(fn: Converter) -> Converter:
        for name in names:
            _CONVERTERS.setdefault(name, []).append((when, fn))
        return fn

    return register


def find_converter(ctx: ConversionContext, node: torch.fx.Node) -> Converter:
    name = op_name(node)
    for when, fn in _CONVERTERS.get(name, []):
        if when is None or when(ctx, node):
            return fn
    raise OnnxExportError(f"no ONNX converter for {name} (node {node.name})")


def supported_ops() -> list[str]:
    return sorted(_CONVERTERS)


def _out_dtype(node: torch.fx.Node) -> torch.dtype:
    value = value_of(node)
    if isinstance(value, torch.Tensor):
        return value.dtype
    raise OnnxExportError(f"{node.name} ({op_name(node)}) has no tensor result type")


def _axis(dim: int, rank: int) -> int:
    return dim % rank if rank else 0


def _arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# --- no-ops ----------------------------------------------------------------------------------------------------


@converter("aten._assert_tensor_metadata", "aten._assert_scalar", "aten.sym_constrain_range_for_size")
def _drop(ctx: ConversionContext, node: torch.fx.Node) -> None:
    return None


@converter("aten.alias", "aten.clone", "aten.contiguous", "aten.detach", "aten.lift_fresh_copy")
def _identity(ctx: ConversionContext, node: torch.fx.Node) -> Any:
    return ctx.values[node.args[0]]


@converter("getitem")
def _getitem(ctx: ConversionContext, node: torch.fx.Node) -> Any:
    container, index = node.args
    return ctx.values[container][index]


# --- sizes -----------------------------------------------------------------------------------------------------


@converter("aten.sym_size.int")
def _sym_size(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    source, dim = node.args
    dim = _axis(dim, rank_of(source))
    return ctx.op("Shape", [ctx.tensor(source)], {"start": dim, "end": dim + 1})


def _sym_binary(onnx_op: str) -> Converter:
    def convert(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
        left, right = (ctx.size_tensor(arg) for arg in node.args)
        return ctx.op(onnx_op, [left, right])

    return convert


# SymInt arithmetic (batch*seq etc.) on 1-element int64 tensors; floordiv of non-negative sizes is Div.
_SYM_OPS = ((operator.mul, "Mul"), (operator.add, "Add"), (operator.sub, "Sub"), (operator.floordiv, "Div"))
for _python_op, _onnx_op in _SYM_OPS:
    converter(_python_op.__name__)(_sym_binary(_onnx_op))


# --- elementwise -----------------------------------------------------------------------------------------------


def _binary(onnx_op: str) -> Converter:
    def convert(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
        dtype = _out_dtype(node)
        left, right = node.args[0], node.args[1]
        alpha = node.kwargs.get("alpha", 1)
        right_tensor = ctx.cast_to(right, dtype)
        if alpha != 1:
            right_tensor = ctx.op("Mul", [right_tensor, ctx.scalar(alpha, dtype)])
        return ctx.op(onnx_op, [ctx.cast_to(left, dtype), right_tensor])

    return convert


converter("aten.add.Tensor", "aten.add.Scalar")(_binary("Add"))
converter("aten.sub.Tensor", "aten.sub.Scalar")(_binary("Sub"))
converter("aten.mul.Tensor", "aten.mul.Scalar")(_binary("Mul"))
converter("aten.div.Tensor", "aten.div.Scalar")(_binary("Div"))


def _unary(*onnx_ops: str) -> Converter:
    def convert(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
        result = ctx.cast_to(node.args[0], _out_dtype(node))
        for onnx_op in onnx_ops:
            result = ctx.op(onnx_op, [result])
        return result

    return convert


converter("aten.neg")(_unary("Neg"))
converter("aten.sin")(_unary("Sin"))
converter("aten.cos")(_unary("Cos"))
converter("aten.exp")(_unary("Exp"))
converter("aten.sigmoid")(_unary("Sigmoid"))
converter("aten.sqrt")(_unary("Sqrt"))
converter("aten.rsqrt")(_unary("Sqrt", "Reciprocal"))
converter("aten.reciprocal")(_unary("Reciprocal"))


@converter("aten.silu")
def _silu(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    x = ctx.tensor(node.args[0])
    return ctx.op("Mul", [x, ctx.op("Sigmoid", [x])])


@converter("aten.pow.Tensor_Scalar")
def _pow(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    base, exponent = node.args
    dtype = _out_dtype(node)
    x = ctx.cast_to(base, dtype)
    if exponent == 2:
        return ctx.op("Mul", [x, x])
    return ctx.op("Pow", [x, ctx.scalar(float(exponent), dtype)])


def _comparison_operands(ctx: ConversionContext, node: torch.fx.Node) -> tuple[gs.Tensor, gs.Tensor]:
    """Both operands in their promoted dtype (a Python number takes the tensor operand's dtype)."""
    left, right = node.args
    dtype = dtype_of(left)
    if isinstance(right, torch.fx.Node) and dtype_of(right) != dtype:
        dtype = torch.promote_types(dtype, dtype_of(right))
    return ctx.cast_to(left, dtype), ctx.cast_to(right, dtype)


@converter("aten.eq.Scalar", "aten.eq.Tensor", "aten.ne.Scalar", "aten.ne.Tensor")
def _equal(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    equal = ctx.op("Equal", list(_comparison_operands(ctx, node)))
    return ctx.op("Not", [equal]) if op_name(node).startswith("aten.ne") else equal


def _compare(onnx_op: str) -> Converter:
    def convert(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
        return ctx.op(onnx_op, list(_comparison_operands(ctx, node)))

    return convert


# `shard`'s vocabulary-parallel embedding: mask = (ids >= lo) & (ids < hi); where(mask, ids - lo, 0); ...
converter("aten.ge.Scalar", "aten.ge.Tensor")(_compare("GreaterOrEqual"))
converter("aten.lt.Scalar", "aten.lt.Tensor")(_compare("Less"))


@converter("aten.logical_and")
def _logical_and(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    left, right = node.args
    return ctx.op("And", [ctx.cast_to(left, torch.bool), ctx.cast_to(right, torch.bool)])


@converter("aten.where.self", "aten.where.ScalarOther")
def _where(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    condition, chosen, other = node.args
    dtype = _out_dtype(node)
    return ctx.op("Where", [ctx.cast_to(condition, torch.bool), ctx.cast_to(chosen, dtype), ctx.cast_to(other, dtype)])


@converter("aten._to_copy", "aten.to.dtype", "aten._to_dtype")
def _to_copy(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    source = node.args[0]
    target = _out_dtype(node)
    if dtype_of(source) == target:
        return ctx.tensor(source)
    return ctx.cast(ctx.tensor(source), target)


# --- reductions and normalizations -----------------------------------------------------------------------------


def _reduce(onnx_op: str) -> Converter:
    def convert(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
        source = node.args[0]
        dims = _arg(node, 1, "dim")
        keepdim = bool(_arg(node, 2, "keepdim", False))
        rank = rank_of(source)
        dims = list(range(rank)) if dims is None else [_axis(d, rank) for d in dims]
        x = ctx.cast_to(source, _out_dtype(node))
        return ctx.op(onnx_op, [x, ctx.ints(dims)], {"keepdims": int(keepdim)})

    return convert


converter("aten.mean.dim")(_reduce("ReduceMean"))
converter("aten.sum.dim_IntList")(_reduce("ReduceSum"))


@converter("aten.softmax.int", "aten._softmax")
def _softmax(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    source, dim = node.args[0], node.args[1]
    x = ctx.cast_to(source, _out_dtype(node))
    return ctx.op("Softmax", [x], {"axis": _axis(dim, rank_of(source))})


@converter("aten.topk")
def _topk(ctx: ConversionContext, node: torch.fx.Node) -> tuple[gs.Tensor, gs.Tensor]:
    source, k = node.args[0], node.args[1]
    dim = _arg(node, 2, "dim", -1)
    largest = _arg(node, 3, "largest", True)
    sorted_ = _arg(node, 4, "sorted", True)
    attrs = {"axis": _axis(dim, rank_of(source)), "largest": int(largest), "sorted": int(sorted_)}
    return ctx.op("TopK", [ctx.tensor(source), ctx.size_tensor(k)], attrs, outputs=2)


# --- data movement ---------------------------------------------------------------------------------------------


@converter("aten.embedding")
def _embedding(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    weight, indices = node.args[0], node.args[1]
    return ctx.op("Gather", [ctx.tensor(weight), ctx.tensor(indices)], {"axis": 0})


@converter("aten.view", "aten.reshape", "aten._unsafe_view")
def _reshape(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    source, sizes = node.args
    return ctx.op("Reshape", [ctx.tensor(source), ctx.shape_tensor(sizes)])


@converter("aten.transpose.int")
def _transpose(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    source, dim0, dim1 = node.args
    rank = rank_of(source)
    perm = list(range(rank))
    dim0, dim1 = _axis(dim0, rank), _axis(dim1, rank)
    perm[dim0], perm[dim1] = perm[dim1], perm[dim0]
    return ctx.op("Transpose", [ctx.tensor(source)], {"perm": perm})


@converter("aten.permute")
def _permute(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    source, dims = node.args
    rank = rank_of(source)
    return ctx.op("Transpose", [ctx.tensor(source)], {"perm": [_axis(d, rank) for d in dims]})


@converter("aten.t")
def _t(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    return ctx.op("Transpose", [ctx.tensor(node.args[0])], {"perm": [1, 0]})


@converter("aten.unsqueeze")
def _unsqueeze(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    source, dim = node.args
    return ctx.op("Unsqueeze", [ctx.tensor(source), ctx.ints([_axis(dim, rank_of(source) + 1)])])


@converter("aten.squeeze.dim", "aten.squeeze.dims")
def _squeeze(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    source, dims = node.args
    rank = rank_of(source)
    dims = [dims] if isinstance(dims, int) else list(dims)
    shape = value_of(source).shape
    # torch skips dims that are not 1; ONNX would fail on them.
    dims = [_axis(d, rank) for d in dims if shape[d] == 1]
    if not dims:
        return ctx.tensor(source)
    return ctx.op("Squeeze", [ctx.tensor(source), ctx.ints(dims)])


@converter("aten.cat")
def _cat(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    tensors = node.args[0]
    dim = _arg(node, 1, "dim", 0)
    dtype = _out_dtype(node)
    return ctx.op("Concat", [ctx.cast_to(t, dtype) for t in tensors], {"axis": _axis(dim, rank_of(node))})


@converter("aten.slice.Tensor")
def _slice(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    source = node.args[0]
    dim = _arg(node, 1, "dim", 0)
    start = _arg(node, 2, "start", None)
    end = _arg(node, 3, "end", None)
    step = _arg(node, 4, "step", 1)
    start = 0 if start is None else start
    end = 2**63 - 1 if end is None else end
    inputs = [
        ctx.tensor(source),
        ctx.size_tensor(start),
        ctx.size_tensor(end),
        ctx.ints([_axis(dim, rank_of(source))]),
        ctx.ints([int(step)]),
    ]
    return ctx.op("Slice", inputs)


@converter("aten.select.int")
def _select(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    source, dim, index = node.args
    if isinstance(index, torch.fx.Node):
        index_tensor = ctx.op("Squeeze", [ctx.tensor(index), ctx.ints([0])])
    else:
        index_tensor = ctx.const(int(index), torch.int64)
    return ctx.op("Gather", [ctx.tensor(source), index_tensor], {"axis": _axis(dim, rank_of(source))})


@converter("aten.split.Tensor", "aten.split_with_sizes")
def _split(ctx: ConversionContext, node: torch.fx.Node) -> tuple[gs.Tensor, ...]:
    source, split = node.args[0], node.args[1]
    dim = _arg(node, 2, "dim", 0)
    outputs = value_of(node)
    axis = _axis(dim, rank_of(source))
    sizes = [out.shape[axis] for out in outputs]
    if any(not isinstance(size, int) for size in sizes):
        raise OnnxExportError(f"{node.name}: split along a symbolic dim is not supported")
    result = ctx.op("Split", [ctx.tensor(source), ctx.ints(sizes)], {"axis": axis}, outputs=len(sizes))
    return result if isinstance(result, tuple) else (result,)


@converter("aten.expand")
def _expand(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    source, sizes = node.args
    # -1 keeps a dim; ONNX Expand broadcasts, so 1 has the same effect.
    sizes = [1 if (isinstance(size, int) and size == -1) else size for size in sizes]
    return ctx.op("Expand", [ctx.tensor(source), ctx.shape_tensor(sizes)])


# --- factories -------------------------------------------------------------------------------------------------


@converter("aten.zeros_like", "aten.ones_like")
def _constant_like(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    dtype = _out_dtype(node)
    fill = 0.0 if op_name(node) == "aten.zeros_like" else 1.0
    # ConstantOfShape's value is a bf16-free 1-element tensor; cast afterwards for bf16.
    value_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    value = gs.Constant(ctx.fresh("fill"), np.asarray([fill], dtype=NUMPY_DTYPES[value_dtype]))
    shape = ctx.op("Shape", [ctx.tensor(node.args[0])])
    result = ctx.op("ConstantOfShape", [shape], {"value": value})
    return ctx.cast(result, dtype) if value_dtype != dtype else result


@converter("aten.arange", "aten.arange.start", "aten.arange.start_step")
def _arange(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    name = op_name(node)
    if name == "aten.arange":
        start, end, step = 0, node.args[0], 1
    else:
        start, end = node.args[0], node.args[1]
        step = node.args[2] if len(node.args) > 2 else 1
    if any(isinstance(v, float) for v in (start, end, step)):
        raise OnnxExportError(f"{node.name}: floating-point arange is not supported")
    result = ctx.op("Range", [ctx.scalar_int(start), ctx.scalar_int(end), ctx.scalar_int(step)])
    dtype = _out_dtype(node)
    return result if dtype == torch.int64 else ctx.cast(result, dtype)


# --- linear algebra --------------------------------------------------------------------------------------------


def emit_linear(ctx: ConversionContext, x: gs.Tensor, weight: gs.Tensor, bias: gs.Tensor | None) -> gs.Tensor:
    result = ctx.op("MatMul", [x, ctx.op("Transpose", [weight], {"perm": [1, 0]})])
    return ctx.op("Add", [result, bias]) if bias is not None else result


@converter("aten.linear", "moec.linear")
def _linear(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    x, weight = node.args[0], node.args[1]
    bias = _arg(node, 2, "bias", None)
    return emit_linear(ctx, ctx.tensor(x), ctx.tensor(weight), ctx.tensor(bias) if bias is not None else None)


@converter("aten.matmul", "aten.bmm", "aten.mm")
def _matmul(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    return ctx.op("MatMul", [ctx.tensor(node.args[0]), ctx.tensor(node.args[1])])


# --- canonical ops ---------------------------------------------------------------------------------------------


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
    sliding_window = int(_arg(node, 4, "sliding_window", 0))
    attrs: dict[str, Any] = {"scale": float(scale)}
    inputs = [q, k, v]
    if sliding_window > 0:
        inputs.append(_causal_mask(ctx, q, sliding_window))
    else:
        attrs["is_causal"] = 1
    if _out_dtype(node) != torch.float32:
        attrs["softmax_precision"] = onnx_dtype(torch.float32)
    out = ctx.op("Attention", inputs, attrs)
    return ctx.op("Transpose", [out], {"perm": [0, 2, 1, 3]})


@converter("moec.attention", when=lambda ctx, node: "attention" in ctx.options.decompose)
def _attention_decomposed(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    """softmax(q kᵀ·scale + mask) v, with k/v heads repeated to the query heads (GQA) by `Expand`."""
    q_node, k_node = node.args[0], node.args[1]
    q, k, v = (ctx.tensor(a) for a in node.args[:3])
    scale = node.args[3]
    sliding_window = int(_arg(node, 4, "sliding_window", 0))
    dtype = _out_dtype(node)
    groups = value_of(q_node).shape[1] // value_of(k_node).shape[1]
    if groups > 1:
        k, v = (_repeat_heads(ctx, t, groups) for t in (k, v))
    scores = ctx.op("MatMul", [q, ctx.op("Transpose", [k], {"perm": [0, 1, 3, 2]})])
    scores = ctx.op("Mul", [ctx.cast(scores, torch.float32), ctx.scalar(float(scale), torch.float32)])
    mask = _causal_mask(ctx, q, sliding_window)
    scores = ctx.op("Where", [mask, scores, ctx.scalar(float("-inf"), torch.float32)])
    probs = ctx.cast(ctx.op("Softmax", [scores], {"axis": -1}), dtype)
    out = ctx.op("MatMul", [probs, v])
    return ctx.op("Transpose", [out], {"perm": [0, 2, 1, 3]})


def _repeat_heads(ctx: ConversionContext, tensor: gs.Tensor, groups: int) -> gs.Tensor:
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


@converter("moec.rms_norm", when=lambda ctx, node: "rms_norm" not in ctx.options.decompose)
def _rms_norm(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    x_node, weight_node, eps = node.args
    x_dtype, weight_dtype, out = dtype_of(x_node), dtype_of(weight_node), _out_dtype(node)
    attrs = {"axis": -1, "epsilon": float(eps), "stash_type": 1}
    x, weight = ctx.tensor(x_node), ctx.tensor(weight_node)
    if x_dtype == torch.float32 and weight_dtype == torch.float32:
        return ctx.op("RMSNormalization", [x, weight], attrs)
    hidden = value_of(x_node).shape[-1]
    unit = ctx.const([1.0] * hidden, torch.float32)
    normalized = ctx.op("RMSNormalization", [ctx.cast(x, torch.float32), unit], attrs)
    return ctx.op("Mul", [ctx.cast_to(weight_node, out), ctx.cast(ctx.cast(normalized, x_dtype), out)])


@converter("moec.rms_norm", when=lambda ctx, node: "rms_norm" in ctx.options.decompose)
def _rms_norm_decomposed(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    x_node, weight_node, eps = node.args
    x_dtype, out = dtype_of(x_node), _out_dtype(node)
    x32 = ctx.cast_to(x_node, torch.float32)
    mean = ctx.op("ReduceMean", [ctx.op("Mul", [x32, x32]), ctx.ints([-1])], {"keepdims": 1})
    inverse = ctx.op("Reciprocal", [ctx.op("Sqrt", [ctx.op("Add", [mean, ctx.scalar(float(eps), torch.float32)])])])
    normalized = ctx.cast(ctx.op("Mul", [x32, inverse]), x_dtype) if x_dtype != torch.float32 else ctx.op(
        "Mul", [x32, inverse]
    )
    return ctx.op("Mul", [ctx.cast_to(weight_node, out), normalized if x_dtype == out else ctx.cast(normalized, out)])


_PASS_THROUGH = {"aten.cos", "aten.sin", "aten.mul.Tensor", "aten._to_copy", "aten.alias", "aten.unsqueeze"}


def _duplicated_halves(node: Any) -> bool:
    """True if `node`'s last dim is provably `[f, f]`: it derives elementwise from `cat([f, f], -1)`."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        name = op_name(node)
        if name == "aten.cat":
            tensors = node.args[0]
            dim = _arg(node, 1, "dim", 0)
            return len(tensors) == 2 and tensors[0] is tensors[1] and dim in (-1, rank_of(node) - 1)
        if name not in _PASS_THROUGH:
            return False
        if name == "aten.mul.Tensor" and isinstance(node.args[1], torch.fx.Node):
            return False
        if name == "aten.unsqueeze" and node.args[1] in (-1, rank_of(node) - 1):
            return False
        node = node.args[0]
    return False


def _rope_fused(ctx: ConversionContext, node: torch.fx.Node) -> bool:
    if "rope" in ctx.options.decompose:
        return False
    x, cos, sin = node.args
    cos_value = value_of(cos)
    return (
        cos_value.dim() == 3
        and cos_value.shape[0] == 1
        and dtype_of(cos) == dtype_of(x) == _out_dtype(node)
        and _duplicated_halves(cos)
        and _duplicated_halves(sin)
    )


@converter("moec.rope", when=_rope_fused)
def _rope(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    x_node, cos_node, sin_node = node.args
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


@converter("moec.rope", when=lambda ctx, node: not _rope_fused(ctx, node))
def _rope_decomposed(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    x_node, cos_node, sin_node = node.args
    dtype = _out_dtype(node)
    half = value_of(x_node).shape[-1] // 2
    x = ctx.cast_to(x_node, dtype)
    cos = ctx.op("Unsqueeze", [ctx.cast_to(cos_node, dtype), ctx.ints([1])])
    sin = ctx.op("Unsqueeze", [ctx.cast_to(sin_node, dtype), ctx.ints([1])])
    first = ctx.op("Slice", [x, ctx.ints([0]), ctx.ints([half]), ctx.ints([-1])])
    second = ctx.op("Slice", [x, ctx.ints([half]), ctx.ints([2 * half]), ctx.ints([-1])])
    rotated = ctx.op("Concat", [ctx.op("Neg", [second]), first], {"axis": -1})
    return ctx.op("Add", [ctx.op("Mul", [x, cos]), ctx.op("Mul", [rotated, sin])])
