"""ONNX converters for the ops `shard`'s vocabulary-parallel embedding emits, which `backends/onnx` does not convert
yet: `aten.ge.Scalar`, `aten.lt.Scalar`, `aten.logical_and`, `aten.where.ScalarOther`.

before: mask = (ids >= lo) & (ids < hi); rows = where(mask, ids - lo, 0); out = where(mask[..., None], embed(rows), 0.0)
after:  GreaterOrEqual / Less / And / Where with constants of the operand's dtype

Registered through `backends.onnx.converters.converter` AFTER the exporter's own converters, so once
`backends/onnx` converts these ops itself, its converters win and these are never used.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs
import torch
import torch.fx

from backends.onnx.context import ConversionContext, dtype_of, value_of
from backends.onnx.converters import converter


def _compare(onnx_op: str):  # noqa: ANN202 - a Converter
    def convert(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
        left, right = node.args
        dtype = dtype_of(left)
        return ctx.op(onnx_op, [ctx.tensor(left), ctx.cast_to(right, dtype)])

    return convert


converter("aten.ge.Scalar")(_compare("GreaterOrEqual"))
converter("aten.lt.Scalar")(_compare("Less"))


@converter("aten.logical_and")
def _logical_and(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    left, right = node.args
    return ctx.op("And", [ctx.cast_to(left, torch.bool), ctx.cast_to(right, torch.bool)])


@converter("aten.where.ScalarOther")
def _where_scalar_other(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    condition, value, other = node.args
    dtype = value_of(node).dtype
    return ctx.op("Where", [ctx.tensor(condition), ctx.cast_to(value, dtype), ctx.cast_to(other, dtype)])
