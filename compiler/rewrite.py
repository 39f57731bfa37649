"""Rules for graph rewrites: pattern + check + rewrite, with a reason whenever a check rejects.

A rule is a function `(node, rewriter) -> replacement node` anchored on an op; it raises `MatchFailure("why")`
when the node does not fit. The driver visits nodes in order, applies the first rule that matches, redirects
the anchor's users to the replacement, and records which rule created each new node (`meta["moec_rule"]`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode

from compiler.ir import Program, op_name


def create_node(
    graph: torch.fx.Graph, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None, rule: str
) -> torch.fx.Node:
    """A call node at the graph's insertion point, named after its op and tagged with the rule that created it."""
    node = graph.call_function(target, args, kwargs or {})
    if isinstance(target, torch._ops.OpOverload):
        node._rename(target._schema.name.split("::")[-1])  # `rms_norm_3`, not `rms_norm_default_3`
    node.meta["moec_rule"] = rule
    return node


class MatchFailure(Exception):
    """A rule's check rejected a node; the message says why (shown by `--explain`)."""


@dataclass(frozen=True)
class Rule:
    name: str
    anchors: tuple[Any, ...]
    rewrite: Callable[[torch.fx.Node, Rewriter], torch.fx.Node]


@dataclass
class Rewriter:
    """Applies rules to one (already cloned) program and keeps what happened."""

    program: Program
    applied: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (rule, node, reason)
    memo: dict[Any, Any] = field(default_factory=dict)  # results rules compute once per program (e.g. mask checks)
    _current_rule: str = ""

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph

    def call(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> torch.fx.Node:
        """Creates a node (at the current insertion point) tagged with the rule that made it."""
        return create_node(self.graph, target, args, kwargs, self._current_rule)

    def weight(self, name: str, expr: Any, before: torch.fx.Node | None = None) -> torch.fx.Node:
        """A new weight placeholder for `expr`, inserted among the weights."""
        first_input = before or next(n for n in self.graph.nodes if n.op == "placeholder" and "weight" not in n.meta)
        with self.graph.inserting_before(first_input):
            node = self.graph.placeholder(name)
        fake_mode = detect_fake_mode([first_input.meta["val"]])
        with fake_mode:
            value = torch.empty(expr.shape, dtype=expr.dtype, device="meta")
        node.meta = {"val": value, "weight": expr, "moec_rule": self._current_rule}
        return node

    def run(self, rules: Sequence[Rule]) -> int:
        by_anchor: dict[Any, list[Rule]] = {}
        for rule in rules:
            for anchor in rule.anchors:
                by_anchor.setdefault(anchor, []).append(rule)
        count = 0
        for node in list(self.graph.nodes):
            if node.graph is not self.graph or node.op != "call_function":
                continue  # erased by an earlier rewrite
            for rule in by_anchor.get(node.target, ()):
                self._current_rule = rule.name
                try:
                    with self.graph.inserting_before(node):
                        replacement = rule.rewrite(node, self)
                except MatchFailure as failure:
                    self.failures.append((rule.name, node.name, str(failure)))
                    continue
                if replacement is not node:
                    if "val" not in replacement.meta:
                        # Computed, not copied from the anchor: shapes agree but strides may not (a transpose
                        # replaced by a contiguous op), and later rules read strides.
                        replacement.meta["val"] = infer_value(replacement)
                    replacement.meta.setdefault("nn_module_stack", node.meta.get("nn_module_stack", {}))
                    node.replace_all_uses_with(replacement)
                self.applied[rule.name] += 1
                count += 1
                break
        return count


def infer_value(node: torch.fx.Node) -> Any:
    """A new node's fake value, from its op's fake kernel and its inputs' recorded values."""
    fake_mode = detect_fake_mode([n.meta["val"] for n in node.all_input_nodes if "val" in n.meta])
    with fake_mode:
        args = torch.fx.node.map_arg(node.args, lambda n: n.meta["val"])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: n.meta["val"])
        return node.target(*args, **kwargs)


# --- matching helpers -------------------------------------------------------------------------------------------


def expect(value: Any, *targets: Any, what: str = "") -> torch.fx.Node:
    """`value` must be a node calling one of `targets`; returns it."""
    if not isinstance(value, torch.fx.Node) or value.op != "call_function" or value.target not in targets:
        got = op_name(value) if isinstance(value, torch.fx.Node) and value.op == "call_function" else repr(value)
        wanted = " or ".join(str(t).replace("aten::", "aten.").split("(")[0] for t in targets)
        raise MatchFailure(f"{what or 'operand'} is {got}, not {wanted}")
    return value


def tensor_value(node: Any) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def is_weight(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "placeholder" and "weight" in node.meta


def layer_of(node: torch.fx.Node) -> str:
    """`layers.3` from the module stack export recorded, or `?`."""
    import re

    for path, _ in reversed(list(node.meta.get("nn_module_stack", {}).values())):
        match = re.search(r"layers\.(\d+)", path)
        if match:
            return f"layers.{match.group(1)}"
    return "?"
