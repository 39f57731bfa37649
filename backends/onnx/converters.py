"""The converter registry: one converter per fx op (ATen as traced, and moec's canonical ops), registered with
`@converter`, and the node-reading helpers converters share.

A converter reads an fx node's arguments through the `ConversionContext` and returns the node's ONNX value (see
`context.py` for how values are represented). Arithmetic follows torch's type promotion: every operand is cast to
the dtype that `node.meta["val"]` records for the result, so `mul(f32, bool)` becomes `Mul(f32, Cast(bool))`.

The converters themselves, by topic: `aten_ops.py` (ATen as traced: elementwise, reductions, sizes, data movement,
factories, matmul), `canonical_ops.py` (`moec.linear`, `moec.attention`, `moec.rms_norm`, `moec.rope`) and
`moe.py` (`moec.moe`, three modes). The exporter (`export.py`) imports all three, which fills the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from backends.onnx.context import ConversionContext, OnnxExportError, value_of
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


def out_dtype(node: torch.fx.Node) -> torch.dtype:
    """The dtype of `node`'s tensor result, which every operand of arithmetic is cast to."""
    value = value_of(node)
    if isinstance(value, torch.Tensor):
        return value.dtype
    raise OnnxExportError(f"{node.name} ({op_name(node)}) has no tensor result type")


def positive_axis(dim: int, rank: int) -> int:
    """`dim` as a non-negative axis of a rank-`rank` value (0 for a scalar)."""
    return dim % rank if rank else 0


def node_arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `index` of `node` when given positionally, else its keyword `name`, else `default`."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)
