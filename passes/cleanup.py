"""Generic clean-up passes: `dce` and `cse`.

dce  before: nodes and weights whose values nothing uses
     after:  only what reaches the output (side-effecting asserts stay; runtime inputs stay)
cse  before: %a = op(x, 1); %b = op(x, 1)   and weights bound twice to one expression (tied embeddings)
     after:  %a = op(x, 1), every use of %b reads %a
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from compiler.ir import Program
from compiler.pass_manager import Pass, PassResult, register_pass


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Remove nodes and weights whose values are never used.

    before: %unused = aten.mul(%x, 2) ; weight %w read by nothing
    after:  both gone (asserts and runtime inputs are kept)
    """

    name = "dce"

    def run(self, program: Program) -> PassResult:
        result = program.clone()
        graph = result.graph
        nodes_before = sum(1 for n in graph.nodes if n.op == "call_function")
        graph.eliminate_dead_code()
        removed_weights = 0
        for node in list(graph.nodes):
            if node.op == "placeholder" and "weight" in node.meta and not node.users:
                graph.erase_node(node)
                removed_weights += 1
        removed_nodes = nodes_before - sum(1 for n in graph.nodes if n.op == "call_function")
        result.graph_module.recompile()
        return PassResult(
            result, removed_nodes + removed_weights > 0, {"nodes_removed": removed_nodes, "weights_removed": removed_weights}
        )


def _key(value: Any) -> Any:
    """A hashable identity for an argument: nodes by identity, containers element-wise."""
    if isinstance(value, torch.fx.Node):
        return ("node", value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    if isinstance(value, float):
        return ("float", repr(value))
    return (type(value).__name__, value)


def _is_pure(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.is_impure():
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags
    return True


@register_pass
@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Merge nodes that compute the same op on the same operands, and weights bound to the same expression.

    before: %a = aten.mul(%x, 2); %b = aten.mul(%x, 2); weights %embed and %lm_head share one tensor
    after:  %a used for both; one weight placeholder
    """

    name = "cse"

    def run(self, program: Program) -> PassResult:
        result = program.clone()
        graph = result.graph
        merged_nodes = merged_weights = 0
        weight_by_expr: dict[int, torch.fx.Node] = {}
        seen: dict[Any, torch.fx.Node] = {}
        for node in list(graph.nodes):
            if node.op == "placeholder" and "weight" in node.meta:
                first = weight_by_expr.setdefault(id(node.meta["weight"]), node)
                if first is not node:
                    node.replace_all_uses_with(first)
                    graph.erase_node(node)
                    merged_weights += 1
                continue
            if not _is_pure(node):
                continue
            key = (node.target, _key(node.args), _key(node.kwargs))
            if key in seen:
                node.replace_all_uses_with(seen[key])
                graph.erase_node(node)
                merged_nodes += 1
            else:
                seen[key] = node
        result.graph_module.recompile()
        return PassResult(
            result, merged_nodes + merged_weights > 0, {"nodes_merged": merged_nodes, "weights_merged": merged_weights}
        )
