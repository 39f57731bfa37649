"""`fuse-moe`: replace each decomposed Mixtral MoE block with one canonical `moe` op.

before (per layer, E experts; `[...]` only in some dtypes/modes):
    %logits = linear(%x, %router_w); [%logits = _to_copy(%logits, f32)]; %probs = softmax(%logits, -1)
    %top = topk(%probs, k); %w = getitem(%top, 0); %idx = getitem(%top, 1); [%w = div(%w, sum(%w, -1))]
    %acc = zeros_like(%x)
    for e in 0..E-1:
        %r_e = sum(mul(%w, eq(%idx, e)), -1, keepdim)            # token's routing weight for expert e
        %g, %u = split(linear(%x, %w13_e), I, -1)                  # w13_e = select(w13, 0, e) or a folded weight
        %y_e = linear(mul(silu(%g), %u), %w2_e)
        %acc = add(%acc, [_to_copy](mul(%y_e, %r_e)))
after:
    %out = moec.moe(%x, %router_w, %w13[E,2I,H], %w2[E,H,I], top_k=k, normalization, "swiglu")

The stacked weights are lazy expressions: the original [E,2I,H] parameter when the experts were selects of it,
otherwise a lazy stack of the per-expert weights (no copy at compile time). The router stays in float32.
Normalization: `renormalize` when the graph divides the top-k weights by their sum (softmax over the top-k
logits, Mixtral's mode 1), `none` when it does not (top-k of the full softmax, mode 0). An explicit option that
contradicts the graph is an error unless `force=true`, which changes what the model computes, deliberately.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx

from compiler import ops
from compiler.errors import MoecError, PreconditionError
from compiler.ir import Program
from compiler.pass_manager import Pass, PassResult, register_pass
from compiler.rewrite import MatchFailure, Rewriter, expect, is_weight, layer_of, tensor_value
from compiler.weights import WeightExpr, select_weight, stack_weights

aten = torch.ops.aten
LINEAR = (ops.linear, aten.linear.default)


@dataclass
class MoeMatch:
    """One decomposed MoE block, as found in the graph."""

    layer: str
    hidden: torch.fx.Node
    router_weight: torch.fx.Node
    top_k: int
    normalization: str
    w13: list[WeightExpr]
    w2: list[WeightExpr]
    output: torch.fx.Node


def _weight_expr(node: torch.fx.Node) -> WeightExpr:
    """A per-expert weight: a weight placeholder, or `select` of one (before `fold-weights` ran)."""
    if is_weight(node):
        return node.meta["weight"]
    if isinstance(node, torch.fx.Node) and node.target == aten.select.int and is_weight(node.args[0]):
        return select_weight(node.args[0].meta["weight"], node.args[1], node.args[2])
    raise MatchFailure(f"expert weight %{getattr(node, 'name', node)} is computed, not a weight")


def _strip_cast(node: torch.fx.Node) -> torch.fx.Node:
    if isinstance(node, torch.fx.Node) and node.target == aten._to_copy.default and set(node.kwargs) <= {"dtype"}:
        return node.args[0]
    return node


def _through_views(node: torch.fx.Node) -> torch.fx.Node:
    """The value a chain of shape-preserving views reads (export leaves `view(view(x))` before canonicalize)."""
    while isinstance(node, torch.fx.Node) and node.target == aten.view.default:
        source, value = node.args[0], tensor_value(node)
        source_value = tensor_value(source)
        if value is None or source_value is None or tuple(value.shape) != tuple(source_value.shape):
            break
        node = source
    return node


def _only_user(node: torch.fx.Node, what: str) -> torch.fx.Node:
    users = [user for user in node.users if user.target != aten._assert_tensor_metadata.default]
    if len(users) != 1:
        raise MatchFailure(f"{what} has {len(users)} users, expected 1")
    return users[0]


def match_moe(topk: torch.fx.Node) -> MoeMatch:
    """Matches the MoE block around a router's `topk`; raises `MatchFailure` saying what did not fit."""
    layer = layer_of(topk)
    top_k = topk.args[1]
    if not isinstance(top_k, int):
        raise MatchFailure("top_k is dynamic")
    if len(topk.args) > 2 and topk.args[2] not in (-1, 1):
        raise MatchFailure("topk is not over the expert dim")
    softmax = expect(topk.args[0], aten.softmax.int, aten._softmax.default, what="topk input")
    logits = _strip_cast(softmax.args[0])
    if tensor_value(softmax).dtype != torch.float32:
        raise MatchFailure("router softmax is not computed in float32")
    router = expect(logits, *LINEAR, what="softmax input")
    hidden, router_weight = router.args[0], router.args[1]
    if not is_weight(router_weight) or (len(router.args) > 2 and router.args[2] is not None):
        raise MatchFailure("router is not a bias-free linear with a weight")
    experts = router_weight.meta["weight"].shape[0]
    getitems = {user.args[1]: user for user in topk.users if user.target == operator.getitem}
    if set(getitems) != {0, 1}:
        raise MatchFailure("topk values and indices are not both used")
    values, indices = getitems[0], getitems[1]

    routing_source = values
    normalization = "none"
    divs = [u for u in values.users if u.target == aten.div.Tensor]
    if divs:
        div = divs[0]
        total = expect(div.args[1], aten.sum.dim_IntList, what="renormalization divisor")
        if total.args[0] is not values or len(values.users) != 2:
            raise MatchFailure("top-k weights are divided by something other than their sum")
        routing_source, normalization = div, "renormalize"

    by_expert: dict[int, torch.fx.Node] = {}
    for eq in indices.users:
        expect(eq, aten.eq.Scalar, what="use of the top-k indices")
        if not isinstance(eq.args[1], int) or not 0 <= eq.args[1] < experts:
            raise MatchFailure(f"indices compared with {eq.args[1]!r}, not an expert id")
        by_expert[eq.args[1]] = eq
    if sorted(by_expert) != list(range(experts)):
        missing = sorted(set(range(experts)) - set(by_expert))
        raise MatchFailure(f"experts {missing} never receive tokens in the graph")

    w13: list[WeightExpr] = []
    w2: list[WeightExpr] = []
    accumulated: torch.fx.Node | None = None
    for expert in range(experts):
        mask = by_expert[expert]
        masked = expect(_only_user(mask, "expert mask"), aten.mul.Tensor, what="expert mask use")
        if routing_source not in masked.args:
            raise MatchFailure(f"expert {expert}'s mask does not select the router's weights")
        routing = expect(_only_user(masked, "masked weights"), aten.sum.dim_IntList, what="masked weights use")
        scaled = expect(_only_user(routing, "routing weight"), aten.mul.Tensor, what="routing weight use")
        down = scaled.args[0] if scaled.args[1] is routing else scaled.args[1]
        down = expect(down, *LINEAR, what=f"expert {expert} output")
        activated = expect(down.args[0], aten.mul.Tensor, what=f"expert {expert} down-projection input")
        silu, up = activated.args
        silu = expect(silu, aten.silu.default, what=f"expert {expert} activation")
        gate, up = silu.args[0], up
        if gate.target != operator.getitem or up.target != operator.getitem or gate.args[0] is not up.args[0]:
            raise MatchFailure(f"expert {expert}: gate and up are not the halves of one projection")
        if (gate.args[1], up.args[1]) != (0, 1):
            raise MatchFailure(f"expert {expert}: gate/up halves are swapped")
        split = expect(gate.args[0], aten.split.Tensor, aten.split_with_sizes.default, what="gate/up source")
        gate_up = expect(split.args[0], *LINEAR, what=f"expert {expert} gate/up")
        if _through_views(gate_up.args[0]) is not _through_views(hidden):
            raise MatchFailure(f"expert {expert} does not read the router's input")
        w13.append(_weight_expr(gate_up.args[1]))
        w2.append(_weight_expr(down.args[1]))
        cast = _only_user(scaled, "weighted expert output")
        contribution = cast if cast.target == aten._to_copy.default else scaled
        add = expect(_only_user(contribution, "expert contribution"), aten.add.Tensor, what="expert accumulation")
        previous = add.args[0] if add.args[1] is contribution else add.args[1]
        if expert == 0:
            zeros = expect(previous, aten.zeros_like.default, aten.zeros.default, what="accumulator start")
            del zeros
        elif previous is not accumulated:
            raise MatchFailure(f"expert {expert}'s output is not added to the running sum")
        accumulated = add
    assert accumulated is not None
    return MoeMatch(layer, hidden, router_weight, top_k, normalization, w13, w2, accumulated)


def _eliminate_dead_code_with_asserts(graph: torch.fx.Graph) -> None:
    """DCE that also drops export's metadata asserts on values nothing else reads (they keep the unfused experts
    alive when fusing a graph that was not canonicalized first)."""
    while True:
        graph.eliminate_dead_code()
        dead_asserts = [
            node
            for node in graph.nodes
            if node.target == aten._assert_tensor_metadata.default
            and node.args[0].op != "placeholder"
            and all(user.target == aten._assert_tensor_metadata.default for user in node.args[0].users)
        ]
        if not dead_asserts:
            return
        for node in dead_asserts:
            graph.erase_node(node)


def find_routers(program: Program) -> list[torch.fx.Node]:
    return [node for node in program.graph.nodes if node.target == aten.topk.default]


@register_pass
@dataclass(frozen=True)
class FuseMoe(Pass):
    """Replace each decomposed Mixtral MoE block (router, top-k, experts, weighted sum) with one `moe` op.

    before: linear -> softmax -> topk -> [renormalize] -> E x (linear, split, silu*up, linear, *routing) -> sum
    after:  moec.moe(x, router_w, w13[E,2I,H], w2[E,H,I], top_k, normalization, "swiglu")
    Options: normalization=auto|none|renormalize (auto reads it from the graph); force=true lets an explicit
    normalization override what the graph computes.
    """

    name = "fuse-moe"
    normalization: Literal["auto", "none", "renormalize"] = "auto"
    force: bool = False

    def _matches(self, program: Program) -> tuple[list[MoeMatch], list[tuple[str, str]]]:
        matches, failures = [], []
        for topk in find_routers(program):
            try:
                matches.append(match_moe(topk))
            except MatchFailure as failure:
                failures.append((layer_of(topk), str(failure)))
        return matches, failures

    def run(self, program: Program) -> PassResult:
        result = program.clone()
        matches, failures = self._matches(result)
        rewriter = Rewriter(result)
        rewriter._current_rule = self.name
        normalizations: dict[str, int] = {}
        for match in matches:
            normalization = match.normalization
            if self.normalization != "auto" and self.normalization != normalization:
                if not self.force:
                    raise MoecError(
                        f"fuse-moe{{normalization={self.normalization}}} contradicts {match.layer}, whose router "
                        f"computes '{normalization}'; pass force=true to change what the model computes"
                    )
                normalization = self.normalization
            normalizations[normalization] = normalizations.get(normalization, 0) + 1
            prefix = match.router_weight.name.removesuffix("_gate_weight").removesuffix("_weight")
            w13 = rewriter.weight(f"{prefix}_experts_w13", stack_weights(match.w13, 0))
            w2 = rewriter.weight(f"{prefix}_experts_w2", stack_weights(match.w2, 0))
            with result.graph.inserting_before(match.output):
                fused = rewriter.call(
                    ops.moe,
                    (match.hidden, match.router_weight, w13, w2, match.top_k, normalization, "swiglu"),
                )
            fused.meta["val"] = match.output.meta["val"]
            fused.meta["nn_module_stack"] = match.output.meta.get("nn_module_stack", {})
            match.output.replace_all_uses_with(fused)
        _eliminate_dead_code_with_asserts(result.graph)
        for node in list(result.graph.nodes):
            if node.op == "placeholder" and "weight" in node.meta and not node.users:
                result.graph.erase_node(node)
        result.graph_module.recompile()
        stats = {"fused": len(matches), "not_fused": len(failures), **{f"normalization_{k}": v for k, v in normalizations.items()}}
        return PassResult(result, bool(matches), stats)

    def explain(self, program: Program) -> list[str]:
        matches, failures = self._matches(program)
        lines = [
            f"{m.layer}: fused (top_k={m.top_k}, {len(m.w13)} experts, normalization={m.normalization})"
            for m in matches
        ]
        lines += [f"{layer}: not fused: {reason}" for layer, reason in failures]
        already = sum(1 for n in program.graph.nodes if n.target == ops.moe)
        if already:
            lines.append(f"{already} layer(s) already hold a fused moe op")
        if not lines:
            lines.append("no MoE router (softmax -> topk) found")
        return sorted(lines, key=_layer_sort_key)


def _layer_sort_key(line: str) -> tuple[int, str]:
    head = line.split(":", 1)[0]
    return (int(head.split(".")[1]), line) if head.startswith("layers.") and head.split(".")[1].isdigit() else (1 << 30, line)
