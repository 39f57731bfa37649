"""`fuse-qkv`: one projection per layer for the queries, keys and values that read the same normalized input.

before (per layer, after canonicalize):
    %q = moec.linear(%x, %wq[Nq,H]); %k = moec.linear(%x, %wk[Nk,H]); %v = moec.linear(%x, %wv[Nv,H])
    ... views/transposes/rope ... moec.attention(%q', %k', %v', ...)   (or moec.(rope_)cached_attention)
after:
    %qkv = moec.linear(%x, %wqkv[Nq+Nk+Nv,H])        # %wqkv = weight concat(wq, wk, wv, dim=0): lazy, no copy
    %split = aten.split_with_sizes(%qkv, [Nq, Nk, Nv], -1); %q = getitem(%split, 0); %k = ...; %v = ...

The concatenated weight is a lazy `concat` rewrite of the three weights, so nothing is read or copied at compile
time. The split is `aten.split_with_sizes` along the static feature dim: the torch backend runs it as a view and the
ONNX exporter writes one `Split`. A projection with a bias, weights of different dtypes, or projections of
different inputs are left alone (`--explain fuse-qkv` says which). For a sharded model run it after `shard`: the
pass manager maps it over the ranks, and each rank concatenates its own slices of the three weights (`shard`
itself expects separate q/k/v projections).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from compiler import ops
from compiler.errors import PreconditionError
from compiler.ir import Program
from compiler.pass_manager import Pass, PassResult, register_pass
from compiler.rewrite import MatchFailure, Rewriter, infer_value, is_weight, layer_of
from compiler.weights import concat_weights, dtype_name

aten = torch.ops.aten
RULE = "fuse-qkv"
ROLES = ("q", "k", "v")
_ATTENTIONS = (ops.attention, *ops.CACHED_ATTENTIONS)  # fuse-rope's op reads q and k before their rope
# What canonical graphs put between a projection and attention's operand (head views, transposes, the rotary).
_HEAD_LAYOUT_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, ops.rope)


class AlreadyFused(MatchFailure):
    """The layer's projections are already this pass's split of one fused projection."""


@dataclass
class QkvMatch:
    """The three projections of one layer, in q, k, v order."""

    layer: str
    linears: tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]

    @property
    def input(self) -> torch.fx.Node:
        return self.linears[0].args[0]


def _bias(linear: torch.fx.Node) -> object:
    return linear.kwargs.get("bias", linear.args[2] if len(linear.args) > 2 else None)


def _projection(operand: object, role: str) -> torch.fx.Node:
    """The moec.linear an attention operand is computed from, through head views, transposes and rope."""
    node = operand
    while isinstance(node, torch.fx.Node) and node.target in _HEAD_LAYOUT_OPS:
        node = node.args[0]
    if isinstance(node, torch.fx.Node) and node.target == operator.getitem:
        split = node.args[0]
        if isinstance(split, torch.fx.Node) and split.meta.get("moec_rule") == RULE:
            raise AlreadyFused("already fused")
    if not (isinstance(node, torch.fx.Node) and node.target == ops.linear):
        raise MatchFailure(f"the {role} projection is not a moec.linear")
    return node


def match_qkv(attention: torch.fx.Node) -> QkvMatch:
    """The q, k, v projections feeding `attention`; raises MatchFailure saying why they cannot be fused."""
    linears = tuple(_projection(operand, role) for operand, role in zip(attention.args[:3], ROLES))
    if len(set(linears)) != 3:
        raise MatchFailure("two of q, k and v come from the same projection")
    for linear, role in zip(linears, ROLES):
        if _bias(linear) is not None:
            raise MatchFailure(f"the {role} projection has a bias")
        if not is_weight(linear.args[1]):
            raise MatchFailure(f"the {role} projection's weight is computed, not a weight")
    dtypes = [linear.args[1].meta["weight"].dtype for linear in linears]
    if len(set(dtypes)) != 1:
        names = ", ".join(f"{role} {dtype_name(dtype)}" for role, dtype in zip(ROLES, dtypes))
        raise MatchFailure(f"mismatched weight dtypes ({names})")
    if len({linear.args[0] for linear in linears}) != 1:
        raise MatchFailure("the q, k and v projections do not share one input")
    return QkvMatch(layer_of(attention), linears)  # type: ignore[arg-type]


def _attentions(program: Program) -> list[torch.fx.Node]:
    return [node for node in program.graph.nodes if node.target in _ATTENTIONS]


def _matches(program: Program) -> tuple[list[QkvMatch], list[tuple[str, MatchFailure]]]:
    matches, failures = [], []
    for attention in _attentions(program):
        try:
            matches.append(match_qkv(attention))
        except MatchFailure as failure:
            failures.append((layer_of(attention), failure))
    return matches, failures


def _fused_weight_name(q_weight: torch.fx.Node) -> str:
    """`layers_0_self_attn_q_proj_weight` -> `layers_0_self_attn_qkv_proj_weight`."""
    head, _, tail = q_weight.name.rpartition("q_proj")
    return f"{head}qkv_proj{tail}" if head or tail else f"{q_weight.name}_qkv"


@register_pass
@dataclass(frozen=True)
class FuseQkv(Pass):
    """Fuse each layer's q, k and v projections of one input into one linear over a lazily concatenated weight.

    before: %q = linear(%x, %wq); %k = linear(%x, %wk); %v = linear(%x, %wv)   (no bias, one dtype)
    after:  %qkv = linear(%x, concat(wq, wk, wv, dim=0)); %q, %k, %v = split_with_sizes(%qkv, [Nq, Nk, Nv], -1)
    Run after canonicalize (and after shard for a sharded model: each rank fuses its own slices). No options.
    """

    name = "fuse-qkv"

    def requires(self, program: Program) -> None:
        if any(node.target == aten.linear.default for node in program.graph.nodes):
            raise PreconditionError("needs canonicalize first: the projections are still aten.linear")

    def run(self, program: Program) -> PassResult:
        result = program.clone()
        matches, failures = _matches(result)
        rewriter = Rewriter(result)
        rewriter._current_rule = RULE
        graph = result.graph
        order = {node: index for index, node in enumerate(graph.nodes)}
        for match in matches:
            weights = [linear.args[1] for linear in match.linears]
            expr = concat_weights([weight.meta["weight"] for weight in weights], 0)
            fused_weight = rewriter.weight(_fused_weight_name(weights[0]), expr)
            sizes = [int(weight.meta["weight"].shape[0]) for weight in weights]
            # Before the first of the three, so the fused value dominates every user of q, k and v.
            first = min(match.linears, key=order.__getitem__)
            with graph.inserting_before(first):
                fused = rewriter.call(ops.linear, (match.input, fused_weight))
                split = rewriter.call(aten.split_with_sizes.default, (fused, sizes, -1))
                parts = [rewriter.call(operator.getitem, (split, index)) for index in range(3)]
            fused._rename("qkv")
            stack = first.meta.get("nn_module_stack", {})
            for node in (fused, split, *parts):
                node.meta["nn_module_stack"] = stack
            for node in (fused, split, *parts):
                node.meta["val"] = infer_value(node)
            for part, linear in zip(parts, match.linears):
                linear.replace_all_uses_with(part)
                graph.erase_node(linear)
            for weight in weights:
                if not weight.users:
                    graph.erase_node(weight)
        result.graph_module.recompile()
        not_fused = [failure for failure in failures if not isinstance(failure[1], AlreadyFused)]
        stats = {"fused": len(matches), "not_fused": len(not_fused), "already_fused": len(failures) - len(not_fused)}
        return PassResult(result, bool(matches), stats)

    def explain(self, program: Program) -> list[str]:
        matches, failures = _matches(program)
        lines = [
            f"{m.layer}: fused (q {_rows(m, 0)} + k {_rows(m, 1)} + v {_rows(m, 2)} rows of "
            f"{m.linears[0].args[1].meta['weight'].shape[1]}, {dtype_name(m.linears[0].args[1].meta['weight'].dtype)})"
            for m in matches
        ]
        lines += [
            f"{layer}: {failure}" if isinstance(failure, AlreadyFused) else f"{layer}: not fused: {failure}"
            for layer, failure in failures
        ]
        return lines or ["fuse-qkv: no moec.attention found"]


def _rows(match: QkvMatch, index: int) -> int:
    return int(match.linears[index].args[1].meta["weight"].shape[0])
