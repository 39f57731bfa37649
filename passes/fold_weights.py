"""`fold-weights`: compute weight-only subgraphs at compile time, lazily, as recorded weight rewrites.

before: %w: bf16[8,28672,4096] = weight ckpt(...)
        %s: bf16[28672,4096] = aten.select.int(%w, 0, 3)
        %y = aten.linear(%x, %s)
after:  %w_select: bf16[28672,4096] = weight select(ckpt(...), dim=0, index=3)   (for a stack: the part itself)
        %y = aten.linear(%x, %w_select)

Only ops with a `WeightExpr` equivalent fold (select, slice, transpose/t/permute of two dims, dtype casts,
static reshapes/views, cat/stack, split + getitem); nothing is read or computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from compiler.ir import Program
from compiler.pass_manager import Pass, PassResult, register_pass
from compiler.weights import (
    WeightExpr,
    cast_weight,
    concat_weights,
    reshape_weight,
    select_weight,
    slice_weight,
    stack_weights,
    transpose_weight,
)

aten = torch.ops.aten

Folder = Callable[[torch.fx.Node, Callable[[Any], Any]], "WeightExpr | list[WeightExpr] | None"]


def _static_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor) and all(isinstance(s, int) for s in value.shape):
        return tuple(value.shape)
    return None


def _fold_slice(node: torch.fx.Node, w: Callable[[Any], Any]) -> WeightExpr | None:
    source, dim, start, end, *rest = list(node.args) + [0, None, None, 1][len(node.args) - 1 :]
    step = rest[0] if rest else 1
    expr = w(source)
    if step != 1 or not all(isinstance(v, (int, type(None))) for v in (start, end)):
        return None
    size = expr.shape[dim]
    start = 0 if start is None else max(0, min(size, start + size if start < 0 else start))
    end = size if end is None else max(start, min(size, end + size if end < 0 else end))
    return slice_weight(expr, dim, start, end)


def _fold_permute(node: torch.fx.Node, w: Callable[[Any], Any]) -> WeightExpr | None:
    expr, dims = w(node.args[0]), list(node.args[1])
    moved = [i for i, d in enumerate(dims) if d % len(dims) != i]
    if not moved:
        return expr
    if len(moved) == 2 and dims[moved[0]] % len(dims) == moved[1]:
        return transpose_weight(expr, moved[0], moved[1])
    return None


def _fold_copy(node: torch.fx.Node, w: Callable[[Any], Any]) -> WeightExpr | None:
    if set(node.kwargs) - {"dtype", "device", "layout", "memory_format", "non_blocking"}:
        return None
    dtype = node.kwargs.get("dtype")
    expr = w(node.args[0])
    return expr if dtype is None else cast_weight(expr, dtype)


def _fold_reshape(node: torch.fx.Node, w: Callable[[Any], Any]) -> WeightExpr | None:
    shape = _static_shape(node)
    return None if shape is None else reshape_weight(w(node.args[0]), shape)


def _fold_split(node: torch.fx.Node, w: Callable[[Any], Any]) -> list[WeightExpr] | None:
    expr, size = w(node.args[0]), node.args[1]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    sizes = [size] * (expr.shape[dim] // size) if isinstance(size, int) else list(size)
    if isinstance(size, int) and expr.shape[dim] % size:
        sizes.append(expr.shape[dim] % size)
    parts, offset = [], 0
    for part in sizes:
        parts.append(slice_weight(expr, dim, offset, offset + part))
        offset += part
    return parts


FOLDERS: dict[Any, Folder] = {
    aten.select.int: lambda n, w: select_weight(w(n.args[0]), n.args[1], n.args[2]),
    aten.slice.Tensor: _fold_slice,
    aten.t.default: lambda n, w: transpose_weight(w(n.args[0]), 0, 1),
    aten.transpose.int: lambda n, w: transpose_weight(w(n.args[0]), n.args[1], n.args[2]),
    aten.permute.default: _fold_permute,
    aten._to_copy.default: _fold_copy,
    aten.alias.default: lambda n, w: w(n.args[0]),
    aten.clone.default: lambda n, w: w(n.args[0]),
    aten.view.default: _fold_reshape,
    aten.reshape.default: _fold_reshape,
    aten.cat.default: lambda n, w: concat_weights([w(a) for a in n.args[0]], n.args[1] if len(n.args) > 1 else 0),
    aten.stack.default: lambda n, w: stack_weights([w(a) for a in n.args[0]], n.args[1] if len(n.args) > 1 else 0),
    aten.split.Tensor: _fold_split,
    aten.split_with_sizes.default: _fold_split,
}


@register_pass
@dataclass(frozen=True)
class FoldWeights(Pass):
    """Turn weight-only subgraphs into lazily recorded weight rewrites (nothing is read).

    before: %s = aten.select.int(%experts_w, 0, 3); aten.linear(%x, %s)
    after:  weight %w_select_3 = select(ckpt(experts_w), 0, 3); aten.linear(%x, %w_select_3)
    """

    name = "fold-weights"

    def run(self, program: Program) -> PassResult:
        result = program.clone()
        graph = result.graph
        folded: dict[torch.fx.Node, Any] = {
            node: node.meta["weight"] for node in result.weight_nodes()
        }
        first_input = next((n for n in graph.nodes if n.op == "placeholder" and "weight" not in n.meta), None)
        count = 0
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            expr = self._fold(node, folded)
            if expr is None:
                continue
            folded[node] = expr
            if isinstance(expr, WeightExpr) and any(user not in folded for user in node.users):
                # Materialize a foldable chain only where something non-foldable consumes it.
                self._bind(graph, node, expr, first_input)
                count += 1
        if count:
            graph.eliminate_dead_code()
            for node in list(graph.nodes):
                if node.op == "placeholder" and "weight" in node.meta and not node.users:
                    graph.erase_node(node)
        result.graph_module.recompile()
        return PassResult(result, count > 0, {"weights_folded": count})

    @staticmethod
    def _fold(node: torch.fx.Node, folded: dict[torch.fx.Node, Any]) -> Any:
        if node.target is getattr(__import__("operator"), "getitem"):
            parts = folded.get(node.args[0])
            return parts[node.args[1]] if isinstance(parts, list) else None
        folder = FOLDERS.get(node.target)
        inputs = node.all_input_nodes
        if folder is None or not inputs or not all(isinstance(folded.get(n), WeightExpr) for n in inputs):
            return None
        try:
            return folder(node, lambda arg: folded[arg])
        except (ValueError, IndexError, TypeError):
            return None

    @staticmethod
    def _bind(graph: torch.fx.Graph, node: torch.fx.Node, expr: WeightExpr, before: torch.fx.Node | None) -> None:
        with graph.inserting_before(before) if before is not None else graph.inserting_before(next(iter(graph.nodes))):
            placeholder = graph.placeholder(f"w_{node.name}")
        placeholder.meta = {"val": node.meta["val"], "weight": expr, "moec_rule": "fold-weights"}
        node.replace_all_uses_with(placeholder)
