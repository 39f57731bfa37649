"""Converters of the ATen ops a traced graph holds (before and beside moec's canonical ops).

Elementwise arithmetic, comparisons and casts; reductions, softmax and top-k; symbolic sizes (`batch*seq` on
1-element int64 tensors); views, transposes, slicing and concatenation; factories (`arange`, `zeros_like`); and
matmul. `aten.ge`/`lt`/`logical_and`/`where` (`shard`'s vocabulary-parallel embedding) become `GreaterOrEqual`/
`Less`/`And`/`Where`.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import torch
import torch.fx

from backends.onnx.context import NUMPY_DTYPES, ConversionContext, OnnxExportError, dtype_of, rank_of, value_of
from backends.onnx.converters import Converter, converter, node_arg, out_dtype, positive_axis
from compiler.ir import op_name


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
    dim = positive_axis(dim, rank_of(source))
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
        dtype = out_dtype(node)
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
        result = ctx.cast_to(node.args[0], out_dtype(node))
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
    dtype = out_dtype(node)
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
    dtype = out_dtype(node)
    return ctx.op("Where", [ctx.cast_to(condition, torch.bool), ctx.cast_to(chosen, dtype), ctx.cast_to(other, dtype)])


@converter("aten._to_copy", "aten.to.dtype", "aten._to_dtype")
def _to_copy(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    source = node.args[0]
    target = out_dtype(node)
    if dtype_of(source) == target:
        return ctx.tensor(source)
    return ctx.cast(ctx.tensor(source), target)


# --- reductions and normalizations -----------------------------------------------------------------------------


def _reduce(onnx_op: str) -> Converter:
    def convert(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
        source = node.args[0]
        dims = node_arg(node, 1, "dim")
        keepdim = bool(node_arg(node, 2, "keepdim", False))
        rank = rank_of(source)
        dims = list(range(rank)) if dims is None else [positive_axis(d, rank) for d in dims]
        x = ctx.cast_to(source, out_dtype(node))
        return ctx.op(onnx_op, [x, ctx.ints(dims)], {"keepdims": int(keepdim)})

    return convert


converter("aten.mean.dim")(_reduce("ReduceMean"))
converter("aten.sum.dim_IntList")(_reduce("ReduceSum"))


@converter("aten.softmax.int", "aten._softmax")
def _softmax(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    source, dim = node.args[0], node.args[1]
    x = ctx.cast_to(source, out_dtype(node))
    return ctx.op("Softmax", [x], {"axis": positive_axis(dim, rank_of(source))})


@converter("aten.topk")
def _topk(ctx: ConversionContext, node: torch.fx.Node) -> tuple[gs.Tensor, gs.Tensor]:
    source, k = node.args[0], node.args[1]
    dim = node_arg(node, 2, "dim", -1)
    largest = node_arg(node, 3, "largest", True)
    sorted_ = node_arg(node, 4, "sorted", True)
    attrs = {"axis": positive_axis(dim, rank_of(source)), "largest": int(largest), "sorted": int(sorted_)}
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
    dim0, dim1 = positive_axis(dim0, rank), positive_axis(dim1, rank)
    perm[dim0], perm[dim1] = perm[dim1], perm[dim0]
    return ctx.op("Transpose", [ctx.tensor(source)], {"perm": perm})


@converter("aten.permute")
def _permute(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    source, dims = node.args
    rank = rank_of(source)
    return ctx.op("Transpose", [ctx.tensor(source)], {"perm": [positive_axis(d, rank) for d in dims]})


@converter("aten.t")
def _t(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    return ctx.op("Transpose", [ctx.tensor(node.args[0])], {"perm": [1, 0]})


@converter("aten.unsqueeze")
def _unsqueeze(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    source, dim = node.args
    return ctx.op("Unsqueeze", [ctx.tensor(source), ctx.ints([positive_axis(dim, rank_of(source) + 1)])])


@converter("aten.squeeze.dim", "aten.squeeze.dims")
def _squeeze(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    source, dims = node.args
    rank = rank_of(source)
    dims = [dims] if isinstance(dims, int) else list(dims)
    shape = value_of(source).shape
    # torch skips dims that are not 1; ONNX would fail on them.
    dims = [positive_axis(d, rank) for d in dims if shape[d] == 1]
    if not dims:
        return ctx.tensor(source)
    return ctx.op("Squeeze", [ctx.tensor(source), ctx.ints(dims)])


@converter("aten.cat")
def _cat(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    tensors = node.args[0]
    dim = node_arg(node, 1, "dim", 0)
    dtype = out_dtype(node)
    return ctx.op("Concat", [ctx.cast_to(t, dtype) for t in tensors], {"axis": positive_axis(dim, rank_of(node))})


@converter("aten.slice.Tensor")
def _slice(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    source = node.args[0]
    dim = node_arg(node, 1, "dim", 0)
    start = node_arg(node, 2, "start", None)
    end = node_arg(node, 3, "end", None)
    step = node_arg(node, 4, "step", 1)
    start = 0 if start is None else start
    end = 2**63 - 1 if end is None else end
    inputs = [
        ctx.tensor(source),
        ctx.size_tensor(start),
        ctx.size_tensor(end),
        ctx.ints([positive_axis(dim, rank_of(source))]),
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
    return ctx.op("Gather", [ctx.tensor(source), index_tensor], {"axis": positive_axis(dim, rank_of(source))})


@converter("aten.split.Tensor", "aten.split_with_sizes")
def _split(ctx: ConversionContext, node: torch.fx.Node) -> tuple[gs.Tensor, ...]:
    source, split = node.args[0], node.args[1]
    dim = node_arg(node, 2, "dim", 0)
    outputs = value_of(node)
    axis = positive_axis(dim, rank_of(source))
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
    dtype = out_dtype(node)
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
    dtype = out_dtype(node)
    return result if dtype == torch.int64 else ctx.cast(result, dtype)


# --- matmul ----------------------------------------------------------------------------------------------------


@converter("aten.matmul", "aten.bmm", "aten.mm")
def _matmul(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    return ctx.op("MatMul", [ctx.tensor(node.args[0]), ctx.tensor(node.args[1])])
